"""Errors that the command line turns into exit codes (architecture: 2 = bad input, nothing changed)."""

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
    """The MLflow tracking store cannot be reached; raised before any training starts."""
