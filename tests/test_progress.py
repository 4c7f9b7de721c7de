"""smcli.progress: what a run says on stderr (issue 16: readable with many failures, no bar in a table)."""

from __future__ import annotations

import io
import sys

from smcli.progress import MAX_ERROR_LINES, Reporter, error_reason, same_terminal
from smcli.results import BagResult, BagSummary


def failed(index: int, error: str) -> BagResult:
    path = f"/data/bags/slide_{index:04d}.safetensors"
    return BagResult(
        BagSummary(bag_id=f"slide_{index:04d}", path=path, status="error", error=f"{path}: {error}")
    )


def test_a_thousand_failures_for_one_reason_are_a_few_lines_and_one_count(monkeypatch):
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    reporter = Reporter(interactive=False)
    reporter.start(1200)
    for index in range(1190):
        reporter.report(
            failed(index, f"bag_id 'slide_{index:04d}' was already used by an earlier input in this run")
        )
    for index in range(1190, 1200):
        reporter.report(failed(index, "not a safetensors bag (bad header)"))
    reporter.finish("0 ok, 0 skipped, 1200 failed")
    lines = [line for line in stderr.getvalue().splitlines() if line.startswith("error:")]
    assert len(lines) == MAX_ERROR_LINES + 10 + 1  # the other reason's 10 are all shown
    assert lines[-1] == (
        "error: 1170 more bags failed: 1170 × bag_id '…' was already used by an earlier input in this run"
    )


def test_error_reason_drops_the_file_and_the_numbers():
    assert error_reason("/x/a.h5: features have 1025 columns", "/x/a.h5") == "features have N columns"


def test_no_progress_bar_when_the_table_goes_to_the_same_terminal(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

        def fileno(self) -> int:
            return 0  # both "streams" are the same descriptor: one terminal

    monkeypatch.setattr(sys, "stderr", Tty())
    monkeypatch.setattr(sys, "stdout", Tty())
    assert same_terminal(sys.stdout, sys.stderr) is True
    assert Reporter(table_on_stdout=True).interactive is False
    assert Reporter(table_on_stdout=False).interactive is True  # -o FILE: stdout carries nothing
