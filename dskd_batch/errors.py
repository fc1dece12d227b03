"""User-facing errors.

A :class:`DskdError` is a problem the user can fix (a missing file, a cache that does not match,
a malformed row). The CLI prints it without a traceback; library callers can catch it. It carries
every problem found, so that one run reports them all at once instead of one per retry.
"""

from __future__ import annotations


class DskdError(Exception):
    """One or more problems the user can fix, with an optional hint on how."""

    def __init__(self, problems: str | list[str], hint: str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.hint = hint
        super().__init__(self.render())

    def __reduce__(self) -> tuple:  # crosses process boundaries (pipeline workers) whole
        return type(self), (self.problems, self.hint)

    def render(self) -> str:
        if len(self.problems) == 1:
            text = self.problems[0]
        else:
            text = f"{len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems)
        if self.hint:
            text += f"\nfix: {self.hint}"
        return text


class CacheCorruptError(DskdError):
    """A cache file is missing, truncated or does not match its recorded checksum."""

