"""One error type for mistakes a user can fix, and the CLI wrapper that prints it as one line.

Anything raised as `UserError` reaches the terminal as `error: <message>` with exit status 2,
never as a traceback. The message names the problem and the fix.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from difflib import get_close_matches

__all__ = ["UserError", "did_you_mean", "run_cli"]


class UserError(Exception):
    """A problem with the user's input (path, file, recipe, flag) that they can fix."""


def did_you_mean(word: str, choices: list[str] | tuple[str, ...] | set[str]) -> str:
    """A ' (did you mean X?)' suffix when `word` is close to one of `choices`, else ''."""
    close = get_close_matches(word, sorted(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run a CLI entry point, turning UserError into a one-line message and exit status 2."""
    try:
        code = main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
