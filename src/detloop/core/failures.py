"""MLflow failures as detloop errors: a permission the server refused, a server that went away.

On a shared ``mlflow server`` (``--app-name basic-auth``) a user without the right permission gets HTTP
403 (``PERMISSION_DENIED``) and wrong credentials HTTP 401 (``UNAUTHENTICATED``); a server that stops
answering surfaces as an ``MlflowException`` wrapping a ``requests`` connection error after MLflow's
retries (bounded by detloop's defaults, :data:`detloop.core.env.TRACKING_HTTP`). :func:`acting` turns
both into :class:`~detloop.core.errors.PermissionRefused` / :class:`~detloop.core.errors.TrackingUnavailable`
naming the server, the user, the action and the permission it needs, where the action is known (the
registry, promotion and stage-run code); :func:`as_detloop_error` is the same translation without
the action, for the one place each entry point (``hydra_entry``, ``detloop``) reports errors.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator

from detloop.core.errors import PermissionRefused, TrackingUnavailable, exit_code

REFUSED = ("PERMISSION_DENIED", "UNAUTHENTICATED")
_ENDPOINT = re.compile(r"endpoint (\S+) failed with error code (\d+)")
_REASONS = (
    "Connection refused",
    "Connection reset",
    "Connection aborted",
    "Remote end closed connection",
    "Read timed out",
    "timed out",
    "Name or service not known",
    "No route to host",
    "too many 5",  # urllib3: "too many 500 error responses"
)


def tracking_user() -> str:
    """The user MLflow sends (``MLFLOW_TRACKING_USERNAME``), or a note that none is set."""
    return os.environ.get("MLFLOW_TRACKING_USERNAME") or "(none: MLFLOW_TRACKING_USERNAME is not set)"


def _uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def _chain(err: BaseException) -> Iterator[BaseException]:
    """``err`` and every exception it was raised from or while handling (MLflow re-raises without ``from``)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _refusal_code(err: BaseException) -> str | None:
    """``PERMISSION_DENIED`` / ``UNAUTHENTICATED`` when ``err`` is the server refusing the user, else None.

    REST calls raise ``MlflowException`` with the error code; artifact transfers through the server's proxy
    raise ``requests.HTTPError`` with the HTTP status.
    """
    import requests
    from mlflow.exceptions import MlflowException

    for e in _chain(err):
        if isinstance(e, MlflowException) and e.error_code in REFUSED:
            return e.error_code
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(e, requests.HTTPError) and status in (401, 403):
            return REFUSED[status == 401]
    return None


def is_refusal(err: BaseException) -> bool:
    """True for the server refusing the user (HTTP 403 permission denied, HTTP 401 bad credentials)."""
    return _refusal_code(err) is not None


def is_unreachable(err: BaseException) -> bool:
    """True when the tracking server did not answer (connection refused or reset, timeout, retries spent, 502-504)."""
    import requests
    import urllib3.exceptions

    lost = (
        requests.ConnectionError,
        requests.Timeout,
        requests.exceptions.RetryError,
        urllib3.exceptions.MaxRetryError,
        urllib3.exceptions.ProtocolError,
        ConnectionError,
        TimeoutError,
    )
    for e in _chain(err):
        if isinstance(e, lost):
            return True
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(e, requests.HTTPError) and status in (502, 503, 504):
            return True
    return False


def reason(err: BaseException) -> str:
    """A short why for a connection failure (e.g. ``Connection refused``), not urllib3's paragraph."""
    text = " ".join(str(e) for e in _chain(err))
    for phrase in _REASONS:
        if phrase in text:
            return phrase if phrase != "too many 5" else "the server kept answering with errors (5xx)"
    innermost = list(_chain(err))[-1]
    return f"{type(innermost).__name__}: {str(innermost)[:200]}"


def refusal(err: BaseException, action: str | None = None, needs: str | None = None) -> PermissionRefused:
    """The PermissionRefused for a 403/401: server, user, action (or MLflow's endpoint) and what it needs."""
    user = tracking_user()
    if _refusal_code(err) == "UNAUTHENTICATED":
        what = f" ({action})" if action else ""
        return PermissionRefused(
            f"MLflow server {_uri()} refused the credentials of user {user!r}{what}: set MLFLOW_TRACKING_USERNAME "
            "and MLFLOW_TRACKING_PASSWORD to an account of that server"
        )
    if action is None:
        text = " ".join(str(e) for e in _chain(err))
        match = _ENDPOINT.search(text)
        action = f"calling {match.group(1)}" if match else text[:200]
    hint = f" needs {needs}" if needs else ""
    return PermissionRefused(
        f"MLflow server {_uri()} refused user {user!r} (permission denied): {action}{hint}; "
        "nothing was changed by this call (ask an admin of the server for the permission)"
    )


def unavailable(err: BaseException, action: str | None = None, after: str = "") -> TrackingUnavailable:
    """The TrackingUnavailable for a server that stopped answering, naming the URI and the action."""
    what = f" while {action}" if action else ""
    tail = f"; {after}" if after else ""
    return TrackingUnavailable(f"MLflow tracking server {_uri()} stopped answering{what}: {reason(err)}{tail}")


def as_detloop_error(err: BaseException) -> PermissionRefused | TrackingUnavailable | None:
    """The detloop error for an MLflow refusal or an unreachable server, else None (a bug: keep its traceback)."""
    if isinstance(err, PermissionRefused | TrackingUnavailable):
        return err
    if is_refusal(err):
        return refusal(err)
    if is_unreachable(err):
        return unavailable(err)
    return None


@contextlib.contextmanager
def acting(action: str, needs: str | None = None, after: str = "") -> Iterator[None]:
    """Translate MLflow refusals and lost connections inside the block into detloop errors naming ``action``.

    ``needs`` is the permission the action needs (e.g. ``EDIT on registered model detloop-detector``);
    ``after`` says what state a lost connection leaves behind.
    """
    try:
        yield
    except (PermissionRefused, TrackingUnavailable):
        raise
    except Exception as err:
        if is_refusal(err):
            raise refusal(err, action, needs) from err
        if is_unreachable(err):
            raise unavailable(err, action, after) from err
        raise


def report(err: BaseException, emit) -> int | None:
    """Report a detloop error, or an MLflow refusal / lost server (translated), with ``emit``; its exit code.

    ``emit`` is called like a logger method (``emit("%s", text)``). None for anything else: a bug, which
    keeps its traceback.
    """
    found = err if exit_code(err) is not None else as_detloop_error(err)
    if found is None:
        return None
    emit("%s", found.render() if hasattr(found, "render") else str(found))
    return exit_code(found)
