"""SIGINT/SIGTERM as an exception, held back while a file is being committed.

The CLI installs `GUARD.handler`; a signal raises smcli.errors.Interrupted at once (the bag in
progress is abandoned and its temporary file removed), except inside `GUARD.critical()` — the
few statements that rename a finished file into place and record it in the bags file — where it
is raised as soon as that section ends. So a file on disk and its row in `_bags.csv` always agree.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

from smcli.errors import Interrupted


class InterruptGuard:
    def __init__(self) -> None:
        self.depth = 0
        self.pending: Interrupted | None = None

    def handler(self, signum: int, frame: object) -> None:
        received = Interrupted(signal.Signals(signum).name, 128 + signum)
        if self.depth:
            self.pending = self.pending or received
            return
        raise received

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if not self.depth and self.pending is not None:
                pending, self.pending = self.pending, None
                raise pending

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Route SIGINT and SIGTERM to `handler` for the duration of the block."""
        previous = {sig: signal.signal(sig, self.handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


GUARD = InterruptGuard()
