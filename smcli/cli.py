"""The smcli command line: parse flags, delegate to one function, render the result.

Exit status: 0 all bags scored; 1 at least one bag failed (the rest are still written);
2 usage errors (bad flags, missing inputs, invalid model, unavailable device).
Only this module prints; torch is imported only by the commands that need it.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated

import typer

from smcli.errors import SmcliError

app = typer.Typer(
    name="smcli",
    help="Per-patch Sm attention for whole-slide bags, identical to torchmil 1.0.2.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

ModelOption = Annotated[
    Path,
    typer.Option(
        "--model", "-m", envvar="SMCLI_MODEL", help="smcli checkpoint (.safetensors); env SMCLI_MODEL."
    ),
]
PatchSizeOption = Annotated[
    float | None,
    typer.Option("--patch-size", help="Coordinate units per patch step; overrides bag metadata and model."),
]
DistThrOption = Annotated[
    float | None,
    typer.Option(
        "--dist-thr", help="Neighbour distance in patch steps (default: the model's, usually sqrt 2)."
    ),
]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _exit_on(err: SmcliError) -> typer.Exit:
    _stderr(f"error: {err}")
    return typer.Exit(code=err.exit_code)


@app.command()
def score(
    inputs: Annotated[
        list[Path],
        typer.Argument(help="Bag files or directories of *.safetensors bags; '-' reads paths from stdin."),
    ],
    model: ModelOption,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="File (.csv/.parquet: one table) or directory (one file per bag)."
        ),
    ] = None,
    fmt: Annotated[str | None, typer.Option("--format", help="csv or parquet (directory output).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    patch_size: PatchSizeOption = None,
    dist_thr: DistThrOption = None,
    features_key: Annotated[
        str, typer.Option("--features-key", help="Tensor name of the features.")
    ] = "features",
    coords_key: Annotated[
        str, typer.Option("--coords-key", help="Tensor name of the coordinates.")
    ] = "coords",
    labels_key: Annotated[
        str, typer.Option("--labels-key", help="Tensor name of 0/1 instance labels.")
    ] = "labels",
    skip_existing: Annotated[
        bool,
        typer.Option("--skip-existing", help="Keep bags whose output file is already complete (resume)."),
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing output files.")] = False,
    fail_fast: Annotated[bool, typer.Option("--fail-fast", help="Stop at the first bag that fails.")] = False,
    shard: Annotated[
        str | None,
        typer.Option("--shard", help="K/N: score only the K-th of N slices of the sorted inputs."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")] = False,
    top_k: Annotated[
        int | None, typer.Option("--top-k", help="Keep only the K highest-attention patches per bag, ranked.")
    ] = None,
) -> None:
    """Score bags: per-patch attention logits and weights (and the bag logit with a head).

    Example:
        smcli score sample_bags/ -m sample_bags/models/sm_abmil.safetensors -o scores/
    """
    from smcli.bags import BagKeys
    from smcli.batch import ScoreRequest, parse_shard, run_score
    from smcli.errors import UsageError
    from smcli.progress import Reporter
    from smcli.scoring import ScoreOptions

    reporter = Reporter(quiet=quiet)
    try:
        for name, value in (("--patch-size", patch_size), ("--dist-thr", dist_thr)):
            if value is not None and not value > 0:
                raise UsageError(f"{name} must be positive, got {value}")
        if top_k is not None and top_k < 1:
            raise UsageError(f"--top-k must be at least 1, got {top_k}")
        if skip_existing and overwrite:
            raise UsageError("--skip-existing and --overwrite exclude each other")
        request = ScoreRequest(
            inputs=_expand_stdin(inputs),
            model=model,
            output=output,
            fmt=fmt,
            device=device,
            options=ScoreOptions(
                BagKeys(features_key, coords_key, labels_key), patch_size, dist_thr, top_k=top_k
            ),
            existing="skip" if skip_existing else "overwrite" if overwrite else "fail",
            fail_fast=fail_fast,
            shard=parse_shard(shard) if shard is not None else None,
        )
        with _signals_interrupt():
            run = run_score(request, reporter.report, reporter.start)
    except SmcliError as err:
        reporter.finish_quietly()
        raise _exit_on(err) from None
    reporter.finish(run.line())
    raise typer.Exit(code=run.exit_code)


def _expand_stdin(inputs: list[Path]) -> list[Path]:
    """'-' stands for the paths on stdin, one per line (e.g. from `find`)."""
    expanded: list[Path] = []
    for item in inputs:
        if str(item) == "-":
            expanded.extend(Path(line.strip()) for line in sys.stdin if line.strip())
        else:
            expanded.append(item)
    return expanded


@contextlib.contextmanager
def _signals_interrupt():
    """SIGINT/SIGTERM raise Interrupted, so the run cleans up and exits 130/143."""
    import signal

    from smcli.errors import Interrupted

    def handler(signum, frame):
        name = signal.Signals(signum).name
        raise Interrupted(name, 128 + signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@app.command()
def convert(
    state_dict: Annotated[Path, typer.Argument(help="torchmil state dict saved with torch.save (.pt).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Checkpoint to write (.safetensors).")],
    act: Annotated[
        str | None, typer.Option(help="tanh, relu or gelu (default: the torchmil class's).")
    ] = None,
    sm_mode: Annotated[str, typer.Option(help="approx or exact.")] = "approx",
    sm_alpha: Annotated[str | None, typer.Option(help="'trainable' or a float in [0, 1).")] = None,
    sm_steps: Annotated[int, typer.Option(help="Approx Sm steps.")] = 10,
    sm_where: Annotated[str, typer.Option(help="early, mid, late or none.")] = "early",
    patch_size: PatchSizeOption = None,
    dist_thr: Annotated[float, typer.Option("--dist-thr", help="Neighbour distance in patch steps.")] = 2
    ** 0.5,
) -> None:
    """Turn a torchmil SmAttentionPool/SmABMIL state dict into an smcli checkpoint.

    in_dim, att_dim, spectral_norm and the head are read off the tensors; the .pt is read with
    torch.load(weights_only=True), so a pickle that tries to run code is refused.

    Example:
        smcli convert smabmil.pt -o model.safetensors --sm-alpha trainable --sm-where early
    """
    from smcli.checkpoint import ConvertOptions
    from smcli.checkpoint import convert as convert_checkpoint
    from smcli.errors import UsageError

    try:
        alpha = _parse_alpha(sm_alpha)
        for name, value in (("--patch-size", patch_size), ("--dist-thr", dist_thr)):
            if value is not None and not value > 0:
                raise UsageError(f"{name} must be positive, got {value}")
        options = ConvertOptions(act, sm_mode, alpha, sm_steps, sm_where, patch_size, dist_thr)
        result = convert_checkpoint(state_dict, output, options)
    except SmcliError as err:
        raise _exit_on(err) from None
    for note in result.notes:
        _stderr(f"note: {note}")
    pool = result.config.pool
    _stderr(
        f"smcli: wrote {output} ({'SmABMIL' if result.config.head else 'SmAttentionPool'}, "
        f"in_dim {pool.in_dim}, att_dim {pool.att_dim}, {pool.sm_mode}/{pool.sm_where}, "
        f"alpha {pool.sm_alpha})"
    )


def _parse_alpha(text: str | None):
    from smcli.errors import UsageError

    if text is None or text == "trainable":
        return text
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"--sm-alpha must be 'trainable' or a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise UsageError(f"--sm-alpha must be in [0, 1), got {text}")
    return value


def main() -> None:
    app()
