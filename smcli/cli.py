"""The smcli command line: parse flags, delegate to one function, render the result.

Exit status: 0 all bags scored; 1 at least one bag failed (the rest are still written);
2 usage errors (bad flags, missing inputs, invalid model, unavailable device).
Only this module prints; torch is imported only by the commands that need it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from smcli.errors import SmcliError, printable

app = typer.Typer(
    name="smcli",
    help="Per-patch Sm attention for whole-slide bags, identical to torchmil 1.0.2.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from smcli import __version__  # the package root only: no numpy, no torch

        _data(f"smcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print smcli's version and exit."
        ),
    ] = False,
) -> None:
    """Per-patch Sm attention for whole-slide bags, identical to torchmil 1.0.2."""


ModelOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--model",
        "-m",
        help="smcli checkpoint (.safetensors); repeat for an ensemble; env SMCLI_MODEL (one path).",
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
FeaturesKeyOption = Annotated[
    str, typer.Option("--features-key", help="Name of the features tensor/dataset.")
]
CoordsKeyOption = Annotated[str, typer.Option("--coords-key", help="Name of the coordinates tensor/dataset.")]
LabelsKeyOption = Annotated[str, typer.Option("--labels-key", help="Name of the 0/1 instance labels.")]
ColumnOption = Annotated[str, typer.Option("--column", help="Table column to draw.")]
# the colour scale and overlay options, shared by every command that draws attention (heatmap, view)
NormOption = Annotated[
    str,
    typer.Option(
        "--norm",
        help="rank (percentiles within each bag, the default), minmax, raw or log; "
        "--norm raw --vmin A --vmax B puts every bag on one fixed scale.",
    ),
]
CmapOption = Annotated[str, typer.Option("--cmap", help="matplotlib colour map name.")]
VminOption = Annotated[
    float | None, typer.Option("--vmin", help="With --norm raw: the value at the bottom of a fixed scale.")
]
VmaxOption = Annotated[
    float | None, typer.Option("--vmax", help="With --norm raw: the value at the top of a fixed scale.")
]
AlphaOption = Annotated[
    float | None,
    typer.Option(
        "--alpha",
        help="One opacity for every colour over the slide (default: rising with the value, "
        "0.15 at the bottom of the scale to 0.9 at the top).",
    ),
]
MppOption = Annotated[
    float | None,
    typer.Option(
        "--mpp",
        help="Micrometres per level-0 pixel of the slide, for coords in micrometres (STAMP); "
        "overrides the slide's openslide.mpp-x/y.",
    ),
]
OverwriteOption = Annotated[bool, typer.Option("--overwrite", help="Replace existing output files.")]


def _stderr(message: str) -> None:
    print(printable(message), file=sys.stderr, flush=True)


def _exit_on(err: SmcliError) -> typer.Exit:
    from smcli.errors import StdoutClosed

    if isinstance(err, StdoutClosed):  # EPIPE stays quiet, as for any Unix filter
        _silence_stdout()
        return typer.Exit(code=err.exit_code)
    _stderr(f"error: {err}")
    return typer.Exit(code=err.exit_code)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush cannot fail a second time."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real stdout (e.g. under a test runner)
        pass


@app.command()
def score(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            help="Bag files (.safetensors, .h5) or directories of them; '-' reads paths from stdin."
        ),
    ],
    model: ModelOption = None,
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
    features_key: FeaturesKeyOption = "features",
    coords_key: CoordsKeyOption = "coords",
    labels_key: LabelsKeyOption = "labels",
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
    ensemble: Annotated[
        str | None,
        typer.Option("--ensemble", help="How several -m models combine: mean (the default) or max."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")] = False,
    top_k: Annotated[
        int | None, typer.Option("--top-k", help="Keep only the K highest-attention patches per bag, ranked.")
    ] = None,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict",
            help="Fail a bag instead of warning: shared cells, few or no edges, an inferred patch step.",
        ),
    ] = False,
) -> None:
    """Score bags: per-patch attention logits and weights (and the bag logit with a head).

    Several -m score every bag with each model, on one graph: per-model columns
    attention_logit_<name> / attention_weight_<name> (name: the checkpoint's file stem), and the
    ensemble's attention_weight and probability (--ensemble mean, the default, or max).

    Example:
        smcli score sample_bags/ -m sample_bags/models/sm_abmil.safetensors -o scores/
    """
    from smcli.bags import BagKeys
    from smcli.batch import ScoreRequest, parse_shard, run_score
    from smcli.errors import UsageError
    from smcli.interrupts import GUARD
    from smcli.progress import Reporter
    from smcli.scoring import ScoreOptions

    reporter = Reporter(quiet=quiet, table_on_stdout=output is None)
    reporter.table_on_stdout = output is None  # such a table cannot carry its coords' unit
    try:
        _check_positive(patch_size=patch_size, dist_thr=dist_thr)
        if top_k is not None and top_k < 1:
            raise UsageError(f"--top-k must be at least 1, got {top_k}")
        if skip_existing and overwrite:
            raise UsageError("--skip-existing and --overwrite exclude each other")
        models = _models(model)
        if ensemble is not None and len(models) < 2:
            raise UsageError("--ensemble needs two or more models (-m A -m B)")
        request = ScoreRequest(
            inputs=_expand_stdin(inputs),
            model=models[0],
            more_models=models[1:],
            ensemble=ensemble or "mean",
            output=output,
            fmt=fmt,
            device=device,
            options=ScoreOptions(
                BagKeys(features_key, coords_key, labels_key),
                patch_size,
                dist_thr,
                top_k=top_k,
                strict=strict,
            ),
            existing="skip" if skip_existing else "overwrite" if overwrite else "fail",
            fail_fast=fail_fast,
            shard=parse_shard(shard) if shard is not None else None,
        )
        with GUARD.installed():  # SIGINT/SIGTERM: clean up, summarize, exit 130/143
            run = run_score(request, reporter.report, reporter.start, reporter.note)
    except SmcliError as err:
        reporter.finish_quietly()
        raise _exit_on(err) from None
    reporter.finish(run.line())
    raise typer.Exit(code=run.exit_code)


def _models(given: list[Path] | None) -> list[Path]:
    """The -m checkpoints in order, else SMCLI_MODEL (one path, spaces and all), else a UsageError."""
    import os

    from smcli.errors import UsageError

    if given:
        return list(given)
    if os.environ.get("SMCLI_MODEL"):
        return [Path(os.environ["SMCLI_MODEL"])]
    raise UsageError("no model: pass -m MODEL (or set SMCLI_MODEL)")


def _expand_stdin(inputs: list[Path]) -> list[Path]:
    """'-' stands for the paths on stdin, one per line (e.g. from `find`)."""
    expanded: list[Path] = []
    import os

    for item in inputs:
        if str(item) == "-":  # bytes, decoded as the OS does file names: any name can arrive
            raw = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else os.fsencode(sys.stdin.read())
            expanded.extend(Path(os.fsdecode(line.strip())) for line in raw.split(b"\n") if line.strip())
        else:
            expanded.append(item)
    return expanded


@app.command()
def convert(
    state_dict: Annotated[
        Path,
        typer.Argument(
            help="torchmil training file (.pt/.ckpt): state dict, wrapped or prefixed, or Lightning."
        ),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Checkpoint to write (.safetensors).")],
    config: Annotated[
        Path | None,
        typer.Option("--config", help="JSON file of torchmil constructor and graph settings."),
    ] = None,
    act: Annotated[str | None, typer.Option(help="tanh, relu or gelu.")] = None,
    sm_mode: Annotated[str | None, typer.Option(help="approx or exact.")] = None,
    sm_alpha: Annotated[str | None, typer.Option(help="'trainable' or a float in [0, 1).")] = None,
    sm_steps: Annotated[int | None, typer.Option(help="Approx Sm steps.")] = None,
    sm_where: Annotated[str | None, typer.Option(help="early, mid, late or none.")] = None,
    patch_size: PatchSizeOption = None,
    dist_thr: Annotated[
        float | None, typer.Option("--dist-thr", help="Neighbour distance in patch steps.")
    ] = None,
    normalize: Annotated[
        bool | None,
        typer.Option("--normalize/--no-normalize", help="Normalized adjacency (torchmil norm_adj)."),
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(help="Edge weights: binary or feature_distance (torchmil adj_with_dist)."),
    ] = None,
    origin: Annotated[
        str | None,
        typer.Option(help="Grid origin: min (CAMELYON16/PANDA datasets) or zero (TRIDENT)."),
    ] = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="Refuse to assume any torchmil default (now the default).")
    ] = False,
    assume_defaults: Annotated[
        bool,
        typer.Option(
            "--assume-defaults", help="Take torchmil's default for a setting nothing gives (recorded, noted)."
        ),
    ] = False,
    n_heads: Annotated[
        int | None,
        typer.Option("--n-heads", help="SmTransformerABMIL's transf_n_heads (not in the tensors)."),
    ] = None,
    overwrite: OverwriteOption = False,
) -> None:
    """Turn a torchmil SmAttentionPool/SmABMIL/SmTransformerABMIL training file into an smcli checkpoint.

    in_dim, att_dim, spectral norm, trainable alpha and the head are read off the tensors; every
    other setting comes from a flag, else --config, else the file's hyper_parameters; a setting
    none of them gives is an error (exit 2, naming the flags), unless --assume-defaults takes
    torchmil's default, named on one `note:` line and recorded. The file is read with
    torch.load(weights_only=True): a pickle that tries to run code is refused.
    SmTransformerABMIL: the encoder's layers, dims and MLP come from the tensors; --n-heads (or
    transf_n_heads in --config) is required; its other transf_* settings come from --config.

    Example:
        smcli convert smabmil.pt -o model.safetensors --config train_config.json
    """
    from smcli.convert import ConvertOptions
    from smcli.convert import convert as convert_checkpoint
    from smcli.errors import UsageError

    try:
        if strict and assume_defaults:
            raise UsageError("--strict and --assume-defaults exclude each other")
        alpha = _parse_alpha(sm_alpha)
        _check_positive(patch_size=patch_size, dist_thr=dist_thr)
        options = ConvertOptions(
            act,
            sm_mode,
            alpha,
            sm_steps,
            sm_where,
            patch_size,
            dist_thr,
            normalize,
            weights,
            origin,
            config,
            strict,
            n_heads=n_heads,
            assume_defaults=assume_defaults,
            overwrite=overwrite,
        )
        result = convert_checkpoint(state_dict, output, options)
    except SmcliError as err:
        raise _exit_on(err) from None
    if result.assumed:
        _stderr(f"note: {state_dict}: assumed torchmil defaults {', '.join(result.assumed)}")
    for note in result.notes:
        _stderr(f"note: {state_dict}: {note}")
    pool = result.config.pool
    _stderr(
        f"smcli: wrote {output} from a {result.found} "
        f"({result.config.kind}, in_dim {pool.in_dim}, "
        f"att_dim {pool.att_dim}, {pool.sm_mode}/{pool.sm_where}, alpha {pool.sm_alpha})"
    )


@app.command("convert-bag")
def convert_bag(
    source: Annotated[Path, typer.Argument(help="Bag to convert: TRIDENT/CLAM/STAMP .h5 or safetensors.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Bag to write (.safetensors).")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")] = False,
    features_key: FeaturesKeyOption = "features",
    coords_key: CoordsKeyOption = "coords",
    labels_key: LabelsKeyOption = "labels",
) -> None:
    """Write any bag smcli reads as a safetensors bag, its geometry kept in the metadata.

    The metadata gets bag_id, source_format, coords_units and patch_size (when the source knows
    its step, e.g. TRIDENT's patch_size_level0 or STAMP's tile_size_um). Written atomically.

    Example:
        smcli convert-bag trident/features_uni_v1/slide_01.h5 -o bags/slide_01.safetensors
    """
    from smcli.bags import BagKeys
    from smcli.convert_bag import convert_to_safetensors

    try:
        bag = convert_to_safetensors(source, output, BagKeys(features_key, coords_key, labels_key), overwrite)
    except SmcliError as err:
        raise _exit_on(err) from None
    step = "no patch_size (inferred later)" if bag.patch_size is None else f"patch_size {bag.patch_size:g}"
    _stderr(
        f"smcli: wrote {output} ({bag.metadata.get('format', 'safetensors')}, {bag.n_instances} patches "
        f"x {bag.features.shape[1]}, {step})"
    )


@app.command("inspect")
def inspect_files(
    files: Annotated[list[Path], typer.Argument(help="Bags (.safetensors, .h5) and/or smcli checkpoints.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document (a list).")] = False,
    model: Annotated[
        Path | None,
        typer.Option("--model", "-m", help="Grid bags as this checkpoint would (its patch_size, dist_thr)."),
    ] = None,
    patch_size: PatchSizeOption = None,
    dist_thr: DistThrOption = None,
    features_key: FeaturesKeyOption = "features",
    coords_key: CoordsKeyOption = "coords",
    labels_key: LabelsKeyOption = "labels",
) -> None:
    """Show what a file holds: a bag's format, tensors, units, patch step and graph, or a checkpoint.

    For a bag: where the patch step comes from, the edges and mean degree of the graph `score`
    would build, and the same warnings. For a checkpoint: config, parameters, sha256. Output on
    stdout; a file that is neither gives an error line on stderr and exit status 1.

    Example:
        smcli inspect trident/features_uni_v1/slide_01.h5 -m model.safetensors
    """
    import json

    from smcli.bags import BagKeys, find_bags
    from smcli.errors import UsageError
    from smcli.inspect import inspect_file

    try:
        _check_positive(patch_size=patch_size, dist_thr=dist_thr)
        paths = find_bags(files)  # a directory means its bag and checkpoint files
        if not paths:
            raise UsageError(f"nothing to inspect in {', '.join(map(str, files))}")
        loaded = None
        if model is not None:
            from smcli.checkpoint import load_model

            loaded = load_model(model)
    except SmcliError as err:
        raise _exit_on(err) from None
    keys = BagKeys(features_key, coords_key, labels_key)
    documents, failed = [], False
    for path in paths:
        try:
            info = inspect_file(path, loaded, patch_size, dist_thr, keys)
        except SmcliError as err:
            _stderr(f"error: {err}")
            info, failed = {"path": str(path), "kind": "error", "error": str(err)}, True
        documents.append(info)
        if not as_json and info["kind"] != "error":
            _data("\n".join(_inspect_lines(info)))
    if as_json:
        _data(json.dumps(documents, indent=2))
    raise typer.Exit(code=1 if failed else 0)


def _data(text: str) -> None:
    """One block of data on stdout, every byte or an error line (full disk) / quiet exit 1 (EPIPE)."""
    from smcli.files import write_stdout

    try:
        write_stdout((text + "\n").encode("utf-8", "surrogateescape"))  # file names: their own bytes
    except SmcliError as err:
        raise _exit_on(err) from None


def _inspect_lines(info: dict) -> list[str]:
    """Aligned `name  value` lines for one inspect_file() document."""
    tensors = "; ".join(f"{t['name']} {tuple(t['shape'])} {t['dtype']}" for t in info["tensors"])
    if info["kind"] == "checkpoint":
        pool = info["config"].get("pool", {})
        graph = info["config"].get("graph", {})
        rows = [
            ("model", f"{info['model']} (in_dim {info['in_dim']}, head {'yes' if info['head'] else 'no'})"),
            ("layout", info["architecture"]),
            ("pool", ", ".join(f"{k} {v}" for k, v in pool.items())),
            ("graph", ", ".join(f"{k} {v}" for k, v in graph.items())),
            ("parameters", f"{info['n_parameters']:,}"),
            ("sha256", info["sha256"]),
            ("tensors", tensors),
        ]
        if "transformer" in info["config"]:
            rows.insert(
                3, ("transformer", ", ".join(f"{k} {v}" for k, v in info["config"]["transformer"].items()))
            )
        if info["config"].get("assumed"):  # settings `convert` took from torchmil defaults
            rows.insert(3, ("assumed", ", ".join(info["config"]["assumed"])))
    else:
        low, high = info["coords_min"], info["coords_max"]
        span = f"x {low[0]}..{high[0]}, y {low[1]}..{high[1]}"
        rows = [
            ("format", info["format"]),
            ("bag id", info["bag_id"]),
            ("tensors", tensors),
            ("patches", f"{info['n_instances']} x {info['feature_dim']} features ({info['features_dtype']})"),
            ("coords", f"{info['coords_dtype']}, {info['coords_units']}, {span}"),
            (
                "patch step",
                f"{info['patch_step']:g} ({info['patch_step_source']}: {info['patch_step_origin']})",
            ),
            (
                "graph",
                f"{info['n_edges']} edges, mean degree {info['mean_degree']:.2f}, "
                f"{info['isolated']} isolated, grid {info['grid'][0]} x {info['grid'][1]}, "
                f"dist_thr {info['dist_thr']:.4g}",
            ),
        ]
        if info["n_labelled"] is not None:
            rows.append(("labels", f"{info['n_labelled']} of {info['n_instances']} patches are 1"))
    lines = [f"{info['path']}  ({info['kind']})"]
    lines += [f"  {name:<11} {value}" for name, value in rows]
    lines += [f"  warning: {text}" for text in info.get("warnings", [])]
    return lines


@app.command("heatmap")
def heatmap(
    inputs: Annotated[
        list[Path], typer.Argument(help="Scores tables (.csv/.parquet from `smcli score`), or bags with -m.")
    ],
    output: Annotated[
        Path,
        typer.Option("--output", "-o", help="Directory (one <bag_id>.png per bag) or a .png for one bag."),
    ],
    model: Annotated[
        Path | None,
        typer.Option("--model", "-m", envvar="SMCLI_MODEL", help="Checkpoint to score bag inputs with."),
    ] = None,
    column: ColumnOption = "attention_logit",
    norm: NormOption = "rank",
    cmap: CmapOption = "inferno",
    vmin: VminOption = None,
    vmax: VmaxOption = None,
    labels: Annotated[bool, typer.Option("--labels", help="Outline the patches labelled 1.")] = False,
    slide: Annotated[
        Path | None,
        typer.Option("--slide", help="Draw on this slide, or on <bag_id>.* found in this directory."),
    ] = None,
    max_side: Annotated[
        int, typer.Option("--max-side", help="Longer side of the slide picture in pixels.")
    ] = 2000,
    alpha: AlphaOption = None,
    crop: Annotated[
        bool,
        typer.Option(
            "--crop/--no-crop", help="Draw the patches' bounding box plus a margin, or the whole slide."
        ),
    ] = True,
    top_outline: Annotated[
        bool,
        typer.Option(
            "--top-outline/--no-top-outline",
            help="Outline the top tenth of the colour scale on the slide (rank: the top 10% of patches).",
        ),
    ] = False,
    top_patches: Annotated[
        int | None,
        typer.Option("--top-patches", help="With --slide: cut the K highest patches at level 0, as PNGs."),
    ] = None,
    mpp: MppOption = None,
    overwrite: OverwriteOption = False,
    patch_size: PatchSizeOption = None,
    dist_thr: DistThrOption = None,
    features_key: FeaturesKeyOption = "features",
    coords_key: CoordsKeyOption = "coords",
    labels_key: LabelsKeyOption = "labels",
) -> None:
    """Draw per-patch attention as PNG, one image per bag: on the patch grid, or over the slide.

    The colour bar is labelled in the --norm's scale: rank (the default) is within each bag, so a
    negative slide's top patches are as hot as a positive one's; --norm raw --vmin A --vmax B puts
    a cohort on one fixed scale. The title shows the bag id and, when known, the bag probability.
    Without --slide each patch fills its grid cell and a grey checkerboard means no patch. With
    --slide the patches' level-0 footprints are drawn over the slide (--max-side), cropped to the
    tissue (--no-crop: the whole slide), with opacity rising with the value (--alpha: one opacity);
    --top-outline outlines the top tenth of the scale, --labels the label-1 patches; areas without
    patches show the slide as it is. For tables the patch step is --patch-size, else the one the
    score run recorded, else inferred from x, y.
    Coords in micrometres (STAMP) are placed with the slide's microns per pixel, or --mpp.

    Example:
        smcli heatmap scores/ -o heatmaps/ --slide slides/ --top-patches 12
    """
    from smcli.bags import BagKeys
    from smcli.heatmap import HeatmapRequest, run_heatmap

    failed = False
    try:
        _check_positive(patch_size=patch_size, dist_thr=dist_thr)
        request = HeatmapRequest(
            inputs,
            output,
            model,
            column,
            norm,
            labels,
            patch_size,
            dist_thr,
            BagKeys(features_key, coords_key, labels_key),
            cmap=cmap,
            slide=slide,
            max_side=max_side,
            alpha=alpha,
            top_patches=top_patches,
            mpp=mpp,
            vmin=vmin,
            vmax=vmax,
            crop=crop,
            top_outline=top_outline,
            overwrite=overwrite,
        )
        for result in run_heatmap(request):
            for text in result.notes:
                _stderr(f"note: {text}")
            for text in result.warnings:
                _stderr(f"warning: {text}")
            if result.error:
                failed = True
                _stderr(f"error: {result.error}")
            else:
                _stderr(f"smcli: wrote {result.written}")
                if result.top:
                    _stderr(f"smcli: wrote {len(result.top) - 1} top patches and {result.top[-1]}")
    except SmcliError as err:
        raise _exit_on(err) from None
    raise typer.Exit(code=1 if failed else 0)


@app.command("geojson")
def geojson(
    inputs: Annotated[
        list[Path], typer.Argument(help="Scores tables (.csv/.parquet from `smcli score`), or bags with -m.")
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", help="Directory (one <bag_id>.geojson per bag) or a .geojson for one bag."
        ),
    ],
    model: Annotated[
        Path | None,
        typer.Option("--model", "-m", envvar="SMCLI_MODEL", help="Checkpoint to score bag inputs with."),
    ] = None,
    top_k: Annotated[
        int, typer.Option("--top-k", help="Classify the K highest-attention patches 'Top attention'.")
    ] = 10,
    min_percentile: Annotated[
        float, typer.Option("--min-percentile", help="Keep only patches at or above this percentile.")
    ] = 0.0,
    detection: Annotated[
        bool, typer.Option("--detection", help="QuPath detections instead of tiles.")
    ] = False,
    slide: Annotated[
        Path | None,
        typer.Option(
            "--slide", help="The slide (or a directory of <bag_id>.* slides): its MPP, and a bounds check."
        ),
    ] = None,
    mpp: MppOption = None,
    overwrite: OverwriteOption = False,
    patch_size: PatchSizeOption = None,
    dist_thr: DistThrOption = None,
    features_key: FeaturesKeyOption = "features",
    coords_key: CoordsKeyOption = "coords",
    labels_key: LabelsKeyOption = "labels",
) -> None:
    """Write per-patch attention as GeoJSON for QuPath: one square tile per patch, in level-0 pixels.

    Each tile carries measurements attention_logit, attention_weight and attention_percentile
    (colour by them in QuPath); the --top-k highest are classified "Top attention". Drag the file
    onto the slide in QuPath to see the tiles in place. Coords in micrometres (STAMP) are turned
    into level-0 pixels with the --slide's microns per pixel, or --mpp; with neither, the bag fails.

    Example:
        smcli geojson scores/slide_01.csv -o slide_01.geojson --top-k 20 --min-percentile 50
    """
    from smcli.bags import BagKeys
    from smcli.geojson import GeoJsonRequest, run_geojson

    failed = False
    try:
        _check_positive(patch_size=patch_size, dist_thr=dist_thr)
        request = GeoJsonRequest(
            inputs,
            output,
            model,
            top_k,
            min_percentile,
            "detection" if detection else "tile",
            patch_size,
            dist_thr,
            BagKeys(features_key, coords_key, labels_key),
            slide=slide,
            mpp=mpp,
            overwrite=overwrite,
        )
        for result in run_geojson(request):
            for text in result.notes:
                _stderr(f"note: {text}")
            if result.error:
                failed = True
                _stderr(f"error: {result.error}")
            else:
                _stderr(f"smcli: wrote {result.written} ({result.n_features} tiles)")
    except SmcliError as err:
        raise _exit_on(err) from None
    raise typer.Exit(code=1 if failed else 0)


@app.command("view")
def view(
    inputs: Annotated[
        list[Path], typer.Argument(help="Scores tables (.csv/.parquet from `smcli score`), or bags with -m.")
    ],
    model: Annotated[
        Path | None,
        typer.Option("--model", "-m", envvar="SMCLI_MODEL", help="Checkpoint to score bag inputs with."),
    ] = None,
    slide: Annotated[
        Path | None,
        typer.Option("--slide", help="Show on this slide, or on <bag_id>.* found in this directory."),
    ] = None,
    port: Annotated[int, typer.Option("--port", help="Port to listen on (0: any free port).")] = 0,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on (others can reach anything but 127.0.0.1).")
    ] = "127.0.0.1",
    allow_host: Annotated[
        list[str] | None,
        typer.Option("--allow-host", help="Another Host name the browser may use (repeatable)."),
    ] = None,
    no_browser: Annotated[bool, typer.Option("--no-browser", help="Print the URL, open no browser.")] = False,
    mpp: MppOption = None,
    norm: NormOption = "rank",
    cmap: CmapOption = "inferno",
    vmin: VminOption = None,
    vmax: VmaxOption = None,
    column: ColumnOption = "attention_logit",
    patch_size: PatchSizeOption = None,
    dist_thr: DistThrOption = None,
    features_key: FeaturesKeyOption = "features",
    coords_key: CoordsKeyOption = "coords",
    labels_key: LabelsKeyOption = "labels",
) -> None:
    """Look at attention in the browser: the slide at every zoom with each patch's attention in place.

    Serves a local web page (nothing loads from the internet) and prints its URL, with a one-time
    token, as the first line of stdout; Ctrl-C stops it. Hover a patch for its numbers, click a
    top patch to go there, switch bags, or put two tables of one bag side by side (linked pan and
    zoom). --norm, --cmap and --vmin/--vmax set how the page starts (as for heatmap); the page
    changes them. Without --slide the patch grid is the image. Coords in micrometres are placed on the
    slide with its microns per pixel, or --mpp. The page needs the token; only the tables and
    slides named here are served.

    Example:
        smcli view scores/slide_01.csv scores_abmil/slide_01.csv --slide slides/
    """
    from smcli.bags import BagKeys
    from smcli.view.data import ViewBag, ViewRequest, load_bags
    from smcli.view.server import (
        LOCAL_NAMES,
        PageSettings,
        ServeOptions,
        check_settings,
        serve_until_stopped,
        start,
    )

    try:
        _check_positive(patch_size=patch_size, dist_thr=dist_thr)
        settings = PageSettings(norm, cmap, vmin, vmax)
        check_settings(settings)
        keys = BagKeys(features_key, coords_key, labels_key)
        request = ViewRequest(inputs, model, slide, column, patch_size, dist_thr, keys, mpp)
        bags = []
        for item in load_bags(request):
            if isinstance(item, ViewBag):
                bags.append(item)
                for text in item.bag.warnings:
                    _stderr(f"warning: {text}")
                for text in item.notes:
                    _stderr(f"note: {text}")
            else:
                _stderr(f"error: {item.error}")
        if not bags:
            from smcli.errors import BagError

            raise BagError("no bag to show")
        server, url = start(bags, ServeOptions(host, port, tuple(allow_host or ()), settings=settings))
    except SmcliError as err:
        raise _exit_on(err) from None
    if host not in LOCAL_NAMES:
        _stderr(f"warning: listening on {host}: anyone who can reach it and has the URL sees these slides")
    try:
        _data(url)  # the URL is this command's data: every byte or an error, as for any table
    except typer.Exit:  # bound but not serving yet: close it, no shutdown() to wait for
        server.server_close()
        server.viewer.close()
        raise

    def open_browser() -> None:
        if not no_browser:
            import webbrowser

            webbrowser.open(url)

    serve_until_stopped(server, open_browser)
    raise typer.Exit(code=0)


@app.command("evaluate")
def evaluate(
    directories: Annotated[
        list[Path], typer.Argument(help="Output directories of `smcli score -o DIR`, one per model.")
    ],
    targets: Annotated[Path, typer.Option("--targets", help="CSV of slide id -> 0/1 target.")],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Directory for report.json, report.csv, slides.csv, roc.png, pr.png."
        ),
    ] = None,
    id_column: Annotated[str, typer.Option("--id-column", help="Targets column of slide ids.")] = "slide_id",
    target_column: Annotated[
        str, typer.Option("--target-column", help="Targets column of 0/1 targets.")
    ] = "target",
    threshold: Annotated[
        float | None, typer.Option("--threshold", help="Call a slide positive at probability >= T (0.5).")
    ] = None,
    threshold_from: Annotated[
        list[Path] | None,
        typer.Option(
            "--threshold-from",
            help="Scored directory (e.g. validation) to choose the threshold on by Youden's J; one per DIR.",
        ),
    ] = None,
    n_boot: Annotated[int, typer.Option("--n-boot", help="Bootstrap resamples for the 95% CIs.")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the bootstrap.")] = 0,
    model: Annotated[
        str | None,
        typer.Option("--model", help="In ensemble outputs, this member's columns instead of the ensemble's."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print report.json on stdout instead of the table.")
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing report in -o.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="With -o: no table on stderr.")] = False,
) -> None:
    """Evaluate scored directories against slide targets: AUROC, AP, balanced accuracy with CIs.

    Bag level from each directory's _bags.csv probabilities; instance level (localization AUROC,
    mean per bag and pooled) from per-bag tables with a `label` column; DeLong's test for each pair
    of directories on the slides both scored. Without -o the table is the output (stdout); with -o
    it goes to stderr and the report files are written. Slides left out (not in targets, missing,
    failed) are listed on stderr and make the exit status 1.

    Example:
        smcli evaluate out/sm_abmil/ out/abmil/ --targets sample_bags/targets.csv -o report/
    """
    import json

    from smcli.evaluate import EvaluateRequest
    from smcli.evaluate import evaluate as run_evaluation
    from smcli.report import left_out_lines, markdown_table, print_table, report_document, write_report

    try:
        request = EvaluateRequest(
            directories,
            targets,
            id_column,
            target_column,
            threshold,
            threshold_from or [],
            n_boot,
            seed,
            model,
        )
        report = run_evaluation(request)
        if output is not None:
            written = write_report(report, output, overwrite)
    except SmcliError as err:
        raise _exit_on(err) from None
    for line in left_out_lines(report):
        _stderr(f"warning: {line}")
    for model_report in report.models:
        for note in model_report.notes:
            _stderr(f"note: {note}")
    if as_json:
        _data(json.dumps(report_document(report), indent=2))
    elif output is None and sys.stdout.isatty():
        print_table(report, sys.stdout)  # rich boxes for a person
    elif output is None:
        _data(markdown_table(report).removesuffix("\n"))  # data: every byte or an error
    if output is not None:
        if not quiet and not as_json:
            print_table(report, sys.stderr)
        _stderr(f"smcli: wrote {', '.join(str(path) for path in written)}")
    raise typer.Exit(code=0 if report.complete else 1)


def _check_positive(**values: float | None) -> None:
    """UsageError for a given --patch-size / --dist-thr that is not a positive, finite number
    (and a --dist-thr past graph.MAX_DIST_THR: its neighbourhoods would cost memory, not sense)."""
    import math

    from smcli.errors import UsageError
    from smcli.graph import MAX_DIST_THR, just_below_grid_distance

    for name, value in values.items():
        flag = f"--{name.replace('_', '-')}"
        if value is not None and not value > 0:
            raise UsageError(f"{flag} must be positive, got {value}")
        if value is not None and not math.isfinite(value):
            raise UsageError(f"{flag} must be a finite number, got {value}")
        if name == "dist_thr" and value is not None and value > MAX_DIST_THR:
            raise UsageError(f"{flag} {value:g} is beyond {MAX_DIST_THR:g} patch steps")
        if name == "dist_thr" and value is not None:
            ring = just_below_grid_distance(value)
            if ring is not None:  # said once per run, before any bag
                _stderr(
                    f"warning: {flag} {value!r} is just below √{ring} = {math.sqrt(ring)!r} patch steps: "
                    f"neighbours exactly √{ring} apart get no edge; give {math.sqrt(ring):.7g} or more "
                    "to keep them"
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


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """Any Python warning (numpy's RuntimeWarning, ...) as one `warning:` line, never a raw block."""
    _stderr(f"warning: {category.__name__}: {message}")


def main() -> None:
    import warnings

    from typer import exceptions as typer_errors
    from typer._click import exceptions as click_errors  # typer's own copy of click

    warnings.showwarning = _warning_line
    try:
        code = app(standalone_mode=False)
    except click_errors.UsageError as err:
        if type(err).__name__ == "NoArgsIsHelpError":  # `smcli` alone: the help, as click shows it
            err.show()
            sys.exit(err.exit_code)
        # two plain lines instead of a boxed panel: a script's log stays greppable
        _stderr(f"Error: {err.format_message()}")
        if err.ctx is not None:
            _stderr(f"Try '{err.ctx.command_path} -h' for help.")
        sys.exit(err.exit_code)
    except click_errors.ClickException as err:
        _stderr(f"Error: {err.format_message()}")
        sys.exit(err.exit_code)
    except typer_errors.Abort:
        _stderr("Aborted!")
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
