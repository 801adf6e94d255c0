"""The one user-facing error type: whatever a command cannot do for a reason the user can act on.

Every command handler raises CliError with one line of text; `batchmon.cli.main` prints it on stderr (never a
traceback) and exits with its code. It lives here, not in the CLI, so handlers, the recorder and the exporter
raise it without importing the argument parser (which imports them: a cycle).
"""

from __future__ import annotations


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 1 (or .code)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code
