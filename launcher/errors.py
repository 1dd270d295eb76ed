"""User-facing errors: each names the file, line, dotted key and a fix.

The CLI turns a `UserError` into exit code 2 and one readable block of text, never a
traceback. Library code raises it for anything the user can fix by editing a recipe,
a data file or a command line.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the user's input."""

    message: str
    file: str | None = None
    line: int | None = None
    key: str | None = None
    hint: str | None = None

    def render(self) -> str:
        where = self.file or ""
        if self.file and self.line:
            where += f":{self.line}"
        head = ": ".join(x for x in (where, self.key) if x)
        text = f"{head}: {self.message}" if head else self.message
        if self.hint:
            text += f"\n    hint: {self.hint}"
        return text


class UserError(Exception):
    """One or more problems the user can fix; the CLI exits with code 2."""

    def __init__(self, problems: list[Problem] | Problem | str, *, title: str | None = None):
        if isinstance(problems, str):
            problems = [Problem(problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems = list(problems)
        self.title = title
        super().__init__(self.render())

    def render(self) -> str:
        lines = []
        if self.title:
            lines.append(self.title)
        for p in self.problems:
            lines.append(("  - " if self.title else "") + p.render())
        return "\n".join(lines)
