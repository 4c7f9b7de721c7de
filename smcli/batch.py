"""The `score` command's work: inputs -> model -> sink, bag by bag, with a run summary."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from smcli.bags import find_bags
from smcli.errors import OutputError, UsageError
from smcli.scoring import BagResult, ScoreOptions, resolve_device, score_paths


@dataclass(frozen=True)
class ScoreRequest:
    """Everything `smcli score` was asked to do."""

    inputs: list[Path]
    model: Path
    output: Path | None = None
    fmt: str | None = None
    device: str = "auto"
    options: ScoreOptions = field(default_factory=ScoreOptions)


@dataclass
class RunSummary:
    ok: int = 0
    failed: int = 0
    skipped: int = 0

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def line(self) -> str:
        return f"{self.ok} ok, {self.skipped} skipped, {self.failed} failed"


def collect_inputs(inputs: list[Path]) -> list[Path]:
    """Input files and directories -> bag paths. A missing path or an empty input is a usage error."""
    for item in inputs:
        if not item.exists():
            raise UsageError(f"{item}: no such file or directory")
    paths = find_bags(inputs)
    if not paths:
        raise UsageError(f"no bags found in {', '.join(str(i) for i in inputs)} (looked for *.safetensors)")
    return paths


def open_sink(output: Path | None, fmt: str | None):
    from smcli.writers import DirectorySink, StdoutSink, TableSink, output_format

    resolved = output_format(output, fmt)
    if output is None:
        return StdoutSink()
    if output.suffix in (".csv", ".parquet"):
        return TableSink(output, resolved)
    return DirectorySink(output, resolved)


def run_score(request: ScoreRequest, report: Callable[[BagResult], None]) -> RunSummary:
    """Score every input bag into the requested sink; `report` sees each result as it lands."""
    from smcli.checkpoint import load_model

    paths = collect_inputs(request.inputs)
    device = resolve_device(request.device)
    model = load_model(request.model, device)
    sink = open_sink(request.output, request.fmt)
    options = ScoreOptions(request.options.keys, request.options.patch_size, request.options.dist_thr, device)
    summary = RunSummary()
    complete = False
    try:
        for result in score_paths(paths, model, options):
            try:
                sink.add(result)
            except OutputError:
                pass  # the sink marked the bag failed
            if result.ok:
                summary.ok += 1
            else:
                summary.failed += 1
            report(result)
        complete = True
    finally:
        sink.close(complete)
    return summary
