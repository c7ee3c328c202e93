"""MLflow refusals and a lost tracking server as detloop errors, for the tracking and team code.

The translation lives in :mod:`detloop.core.failures` (the entry points in ``core`` report these errors
too, and core imports nothing above it); this module re-exports it where the MLflow-facing code looks.
"""

from detloop.core.failures import (  # noqa: F401
    acting,
    as_detloop_error,
    is_refusal,
    is_unreachable,
    reason,
    refusal,
    tracking_user,
    unavailable,
)
