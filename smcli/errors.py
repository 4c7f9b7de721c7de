"""One exception family. The core raises these; only the CLI turns them into exit codes."""

from __future__ import annotations


def printable(text: str) -> str:
    """`text` as one line that any stream can take: undecodable file-name bytes (surrogate escapes)
    become `\\udcXX`, control characters and line separators `\\xNN` / `\\uNNNN`. For stderr
    lines and `_bags.csv` cells."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


class SmcliError(Exception):
    """Base class: a problem a user can act on. `str(err)` is the one-line message."""

    exit_code = 1


class BagError(SmcliError):
    """A bag (input file) cannot be scored. The batch goes on; the run exits 1."""

    exit_code = 1


class ModelError(SmcliError):
    """The model file is missing, unreadable or invalid. Nothing can be scored: exit 2."""

    exit_code = 2


class UsageError(SmcliError):
    """Bad flags or arguments (device, paths, combinations): exit 2."""

    exit_code = 2


class OutputError(SmcliError):
    """An output file could not be written."""

    exit_code = 1


class StdoutClosed(OutputError):
    """The process reading stdout went away (EPIPE, e.g. `| head`): stop quietly with status 1."""


class Interrupted(BaseException):
    """SIGINT/SIGTERM arrived. A BaseException so that no `except Exception` swallows it."""

    def __init__(self, signal_name: str, exit_code: int) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name
        self.exit_code = exit_code
