"""What `smcli score` tells the user on stderr while it runs.

A rich progress bar when stderr is a terminal (bags done / total, patches per second, ETA, the
latest bag); otherwise plain log lines about every 5% or 30 s; with quiet, nothing but errors.
Errors, warnings and notes are one line each, starting with `error:` / `warning:` / `note:`.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from smcli.errors import printable
from smcli.results import BagResult

LOG_EVERY_SECONDS = 30.0


MAX_ERROR_LINES = 20  # per reason; past that, errors for it are counted, one summary line at the end


def error_reason(error: str, path: str) -> str:
    """What an error says, without the file it names: quoted names and numbers become … and N,
    so a thousand bags failing the same way count as one reason."""
    import re

    text = error[len(path) + 2 :] if path and error.startswith(path + ": ") else error
    text = re.sub(r"'[^']*'", "'…'", text)
    return re.sub(r"\d+(?:\.\d+)?", "N", text)[:160]


def same_terminal(first, second) -> bool:
    """Two streams on one terminal (a table on stdout would be cut by a progress bar on stderr)."""
    import os

    try:
        if not (first.isatty() and second.isatty()):
            return False
        a, b = os.fstat(first.fileno()), os.fstat(second.fileno())
    except (AttributeError, ValueError, OSError):
        return False
    return (a.st_dev, a.st_ino, a.st_rdev) == (b.st_dev, b.st_ino, b.st_rdev)


class Reporter:
    def __init__(
        self, quiet: bool = False, interactive: bool | None = None, table_on_stdout: bool = False
    ) -> None:
        self.quiet = quiet
        if interactive is None:  # no bar when the table itself goes to the same terminal
            interactive = sys.stderr.isatty() and not (
                table_on_stdout and same_terminal(sys.stdout, sys.stderr)
            )
        self.interactive = interactive
        self.shown: dict[str, int] = {}  # reason -> error lines printed for it
        self.unshown: dict[str, int] = {}  # reason -> errors past MAX_ERROR_LINES
        self.total = 0
        self.done = 0
        self.patches = 0
        self.started = time.perf_counter()
        self.last_log = self.started
        self.progress: Any = None  # rich.progress.Progress on a terminal
        self.task: Any = None
        self.inferred_steps: set[float] = set()  # said once each, not once per bag
        self.table_on_stdout = False  # set by the CLI: a stdout CSV has no bags file to record units
        self.units_warned = False

    def line(self, text: str) -> None:
        text = printable(text)
        if self.progress is not None:
            self.progress.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            print(text, file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        """A `note:` line about the whole run (not shown with quiet)."""
        if not self.quiet:
            self.line(f"note: {text}")

    def start(self, total: int) -> None:
        self.total = total
        self.started = self.last_log = time.perf_counter()
        if self.quiet or not self.interactive:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]scoring"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[bag]}"),
            console=Console(stderr=True),
            transient=True,
        )
        self.progress.start()
        self.task = self.progress.add_task("score", total=total, rate="", bag="")

    def report(self, result: BagResult) -> None:
        summary = result.summary
        self.done += 1
        if summary.status == "ok":
            self.patches += summary.n_instances or 0
        if summary.status == "error":
            reason = error_reason(summary.error, summary.path)
            if self.shown.get(reason, 0) < MAX_ERROR_LINES:
                self.shown[reason] = self.shown.get(reason, 0) + 1
                self.line(f"error: {summary.error}")
            else:
                self.unshown[reason] = self.unshown.get(reason, 0) + 1
        elif not self.quiet and summary.status == "ok":  # a skipped bag's figures are from an earlier run
            step = summary.patch_step
            inferred = summary.patch_step_source == "inferred"  # no flag, metadata or model said it
            if inferred and step is not None and step not in self.inferred_steps:
                self.inferred_steps.add(step)
                self.line(f"note: {summary.path}: patch step {step:g} inferred from the coords")
            for warning in summary.warnings:
                self.line(f"warning: {summary.path}: {warning}")
            if self.table_on_stdout and summary.coords_units == "micrometres" and not self.units_warned:
                self.units_warned = True  # once per run
                self.line(
                    f"warning: {summary.path}: coords in micrometres, and a CSV on stdout cannot record "
                    "the unit (heatmap and geojson would take it as level-0 pixels): write it with -o"
                )
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        rate = f"{self.patches / elapsed:,.0f} patches/s"
        if self.progress is not None:
            self.progress.update(self.task, advance=1, rate=rate, bag=printable(summary.bag_id))
        elif not self.quiet and self._log_due():
            self.line(f"smcli: {self.done}/{self.total} bags, {rate}")

    def _log_due(self) -> bool:
        now = time.perf_counter()
        every_5_percent = self.total >= 40 and self.done % (self.total // 20) == 0
        if every_5_percent or now - self.last_log >= LOG_EVERY_SECONDS:
            self.last_log = now
            return self.done < self.total  # the final summary line covers the last bag
        return False

    def finish_quietly(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        self._summarize_unshown()

    def _summarize_unshown(self) -> None:
        """One line for the errors past the first MAX_ERROR_LINES: how many, by reason."""
        if not self.unshown:
            return
        total = sum(self.unshown.values())
        ranked = sorted(self.unshown.items(), key=lambda item: -item[1])
        reasons = "; ".join(f"{count} × {reason}" for reason, count in ranked[:5])
        more = f"; {len(ranked) - 5} other reasons" if len(ranked) > 5 else ""
        print(printable(f"error: {total} more bags failed: {reasons}{more}"), file=sys.stderr, flush=True)
        self.unshown = {}

    def finish(self, summary_line: str) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        self._summarize_unshown()
        if not self.quiet:
            elapsed = time.perf_counter() - self.started
            print(f"smcli: {summary_line} ({elapsed:.1f} s)", file=sys.stderr, flush=True)
