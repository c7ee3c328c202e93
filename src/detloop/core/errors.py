"""Errors that the command line turns into exit codes (architecture: 2 = bad input, nothing changed).

2: BadInput, MoveConflict (nothing changed). 3: TrackingUnavailable, PermissionRefused (the tracking server
cannot be reached or refused the user). Anything else is a bug and exits 1 with its traceback.
"""

from __future__ import annotations


class BadInput(Exception):
    """The user's input is wrong; nothing was written. Carries every problem found.

    Each problem names the file (and line) or config key and what is wrong with it.
    """

    exit_code = 2

    def __init__(self, summary: str, problems: list[str] | None = None):
        self.summary = summary
        self.problems = list(problems or [])
        super().__init__(self.render())

    def render(self, limit: int = 200) -> str:
        lines = [self.summary]
        lines += [f"  - {p}" for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more problems")
        return "\n".join(lines)


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking store cannot be reached (before any work starts, or it went away during a
    stage or a move); exit code 3. The message names the tracking URI and what was being done.
    """

    exit_code = 3


class PermissionRefused(RuntimeError):
    """The MLflow server refused this user an action (HTTP 403, or 401 for bad credentials); exit code 3.

    The message names the server, the user (``MLFLOW_TRACKING_USERNAME``), the action, the resource
    and the permission it needs. Nothing was changed by the refused call.
    """

    exit_code = 3


class MoveConflict(RuntimeError):
    """An alias move refused because another move of the same alias won; exit code 2 (nothing moved).

    Raised when another detloop move of the alias is in flight, or the holder changed since the
    command read it. The message names the holder or the mover. The refused attempt stays in the audit
    trail (``detloop registry --history`` shows it ``[refused]``). Exit 2 as for bad input: the request
    was made against a registry state that no longer holds, so repeating it blindly is wrong; look at
    the new holder first.
    """

    exit_code = 2


def exit_code(err: BaseException) -> int | None:
    """The exit code of a detloop error (BadInput 2, MoveConflict 2, TrackingUnavailable 3, PermissionRefused 3,
    or any detloop exception class with an integer ``exit_code``); None for other exceptions."""
    code = getattr(type(err), "exit_code", None)
    if isinstance(code, int) and type(err).__module__.startswith("detloop."):
        return code
    return None
