"""What every command-line tool of the project shares: one kind of error for bad input, printed as
``<tool>: error: <what was wrong and what to do>`` without a traceback, and a ``--help`` that shows
every default once."""

import argparse
from typing import Callable, Optional, Sequence

from .storage import disk_full_message, is_disk_full


class UsageError(SystemExit):
    """Bad input or a state the user must fix: the message names the flag, file or value and what to
    do. Library code raises it without a tool name; ``run_tool`` adds the tool's."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def run_tool(tool: str, function: Callable, argv: Optional[Sequence[str]] = None):
    """Runs ``function(argv)``; a UsageError or a full disk ends the process with one line on stderr."""
    import warnings

    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    try:
        return function(argv)
    except UsageError as e:
        raise SystemExit(f"{tool}: error: {e.message}") from None
    except OSError as e:
        if not is_disk_full(e):
            raise
        raise SystemExit(f"{tool}: error: {disk_full_message(e.filename or '.')}") from None


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends each option's default once: ``(default: 4t4i)``; ``(default: not set)`` for on/off
    flags (so ``--no-save`` reads the right way round); nothing where the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if text == argparse.SUPPRESS or not action.option_strings or "default" in text.lower():
            return text
        if action.nargs == 0:  # store_true / store_false / count-free switches
            default = "not set"
        elif action.default is None:
            default = "none"
        elif isinstance(action.default, (list, tuple)):
            default = ",".join(str(v) for v in action.default)
        else:
            default = str(action.default).replace("%", "%%")
        return f"{text} (default: {default})" if text else f"(default: {default})"
