"""The `score` command's work: inputs -> model -> sink, bag by bag, with a run summary.

Failure isolation: one bag's failure never stops the others (unless fail_fast). An interrupt
(smcli.errors.Interrupted, raised by the CLI's signal handlers) stops the run after the bag in
progress is cleaned up; every file already renamed into place is complete, and the bags file is
truthful at any moment.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from smcli.bags import find_bags
from smcli.errors import Interrupted, OutputError, UsageError
from smcli.interrupts import GUARD
from smcli.results import BagResult
from smcli.scoring import ScoreOptions, ScoringModel, resolve_device, score_bags


@dataclass(frozen=True)
class ScoreRequest:
    """Everything `smcli score` was asked to do."""

    inputs: list[Path]
    model: Path
    output: Path | None = None
    fmt: str | None = None
    device: str = "auto"
    options: ScoreOptions = field(default_factory=ScoreOptions)
    existing: str = "fail"  # fail | skip | overwrite
    fail_fast: bool = False
    shard: tuple[int, int] | None = None  # (K, N), 1-based
    more_models: list[Path] = field(default_factory=list)  # -m given again: an ensemble with `model`
    ensemble: str = "mean"  # how an ensemble combines its models: mean | max


@dataclass
class RunSummary:
    total: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    interrupted: Interrupted | None = None

    @property
    def exit_code(self) -> int:
        if self.interrupted is not None:
            return self.interrupted.exit_code
        return 1 if self.failed else 0

    def count(self, result: BagResult) -> None:
        status = result.summary.status
        if status == "ok":
            self.ok += 1
        elif status == "skipped":
            self.skipped += 1
        else:
            self.failed += 1

    def line(self) -> str:
        text = f"{self.ok} ok, {self.skipped} skipped, {self.failed} failed"
        if self.interrupted is not None:
            left = self.total - self.ok - self.skipped - self.failed
            text += f"; interrupted by {self.interrupted.signal_name}, {left} not done"
        return text


def parse_shard(text: str) -> tuple[int, int]:
    """'K/N' with 1 <= K <= N -> (K, N)."""
    try:
        k_text, n_text = text.split("/")
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise UsageError(f"--shard must look like K/N (e.g. 3/10), got {text!r}") from None
    if not 1 <= k <= n:
        raise UsageError(f"--shard K/N needs 1 <= K <= N, got {text!r}")
    return k, n


def select_shard(paths: list[Path], shard: tuple[int, int] | None) -> list[Path]:
    """The K-th of N interleaved slices of the sorted list: deterministic, disjoint, complete."""
    if shard is None:
        return paths
    k, n = shard
    return sorted(paths, key=str)[k - 1 :: n]


def collect_inputs(inputs: list[Path]) -> list[Path]:
    """Input files and directories -> bag paths. A missing path or an empty input is a usage error."""
    if not inputs:
        raise UsageError("no inputs (stdin gave no paths)")
    for item in inputs:
        if not item.exists():
            raise UsageError(f"{item}: no such file or directory")
    paths = find_bags(inputs)
    if not paths:
        raise UsageError(
            f"no bags found in {', '.join(str(i) for i in inputs)} (looked for *.safetensors, *.h5, *.hdf5)"
        )
    return paths


def open_sink(request: ScoreRequest):
    from smcli.writers import DirectorySink, StdoutSink, TableSink, output_format

    output = request.output
    resolved = output_format(output, request.fmt)
    if output is None:
        return StdoutSink()
    if output.suffix in (".csv", ".parquet"):
        return TableSink(output, resolved, overwrite=request.existing == "overwrite")
    bags_name = "_bags.csv" if request.shard is None else "_bags.shard-{}-of-{}.csv".format(*request.shard)
    return DirectorySink(output, resolved, request.existing, bags_name, request.options.top_k)


def options_fingerprint(options: ScoreOptions, model) -> str:
    """The scoring options a kept per-bag file must share to be skipped (JSON): the patch size
    asked for, the dist_thr in effect, --top-k, the tensor names and --strict."""
    import json

    config = getattr(model, "config", None)
    dist_thr = options.dist_thr if options.dist_thr is not None else getattr(config, "dist_thr", None)
    keys = options.keys
    return json.dumps(
        {
            "patch_size": options.patch_size,
            "dist_thr": dist_thr,
            "top_k": options.top_k,
            "keys": [keys.features, keys.coords, keys.labels],
            "strict": options.strict,
        },
        sort_keys=True,
    )


def run_score(
    request: ScoreRequest,
    report: Callable[[BagResult], None],
    start: Callable[[int], None] = lambda total: None,
    note: Callable[[str], None] = lambda text: None,
) -> RunSummary:
    """Score every selected bag into the requested sink.

    `start(total)` is called once the bags are known; `report(result)` after each bag lands;
    `note(text)` with anything the user should know about the run as a whole (e.g. a CPU fallback).
    """
    from smcli.checkpoint import load_model

    paths = select_shard(collect_inputs(request.inputs), request.shard)
    device = resolve_device(request.device, note)
    model: ScoringModel
    if request.more_models:  # every model scores every bag, on one graph
        from smcli.ensemble import load_ensemble

        ensemble = load_ensemble([request.model, *request.more_models], device, request.ensemble)
        model, config_json = ensemble, ensemble.config_json()
    else:
        single = load_model(request.model, device)
        model, config_json = single, single.config.to_json()
    sink = open_sink(request)
    sink.model_config_json = config_json
    sink.model_sha256 = model.sha256
    options = replace(request.options, device=device)
    sink.options_json = options_fingerprint(options, model)
    summary = RunSummary(total=len(paths))
    start(len(paths))
    complete = False
    try:
        for result in score_bags(paths, model, options, precheck=sink.precheck):
            with GUARD.critical():  # a signal waits until the bag is written, listed and counted
                try:
                    sink.add(result)
                except OutputError:
                    if sink.fatal_write_errors:
                        raise
                summary.count(result)
                report(result)
            if request.fail_fast and summary.failed:
                break  # a single table stopped early is not written
        else:
            complete = True
    except Interrupted as signal_received:
        summary.interrupted = signal_received
    finally:
        sink.close(complete)
    return summary
