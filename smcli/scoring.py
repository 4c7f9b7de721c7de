"""Bag + model -> per-instance table and bag summary; the batch iterator with read-ahead."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np

from smcli.backends.torch_device import TORCH_EXTRA, require_torch
from smcli.bags import Bag, BagKeys, Geometry, check_input, load_bag, peek_bag_id, resolve_geometry
from smcli.checkpoint import LoadedModel, ModelConfig
from smcli.errors import BagError, SmcliError, UsageError
from smcli.graph import (
    Adjacency,
    GraphError,
    build_adjacency_with,
    duplicate_cells,
    grid_cells_with_origin,
    infer_patch_step,
)
from smcli.results import INSTANCE_COLUMNS, BagResult, BagSummary  # noqa: F401  (the API's names too)

LOW_MEAN_DEGREE = 2.0


@dataclass(frozen=True)
class ScoreOptions:
    """How to read and grid bags. None means: take it from the bag, then the model."""

    keys: BagKeys = BagKeys()
    patch_size: float | None = None
    dist_thr: float | None = None
    device: str = "cpu"
    top_k: int | None = None  # keep only the K highest-attention patches (ties: lower instance first)
    strict: bool = False  # geometry warnings and an inferred patch step fail the bag


NVIDIA_DRIVER = Path("/proc/driver/nvidia/version")  # present whenever the NVIDIA kernel driver is loaded


def cuda_may_be_present() -> bool:
    """False when no NVIDIA driver is loaded, so CUDA cannot be available (decided without torch).

    Importing torch just to learn that CUDA is absent costs over a second per process; the kernel
    driver's /proc entry answers in microseconds. SMCLI_PROBE_CUDA=1 forces the torch check (e.g. a
    container that hides /proc/driver but passes a GPU through).
    """
    import os

    return NVIDIA_DRIVER.exists() or os.environ.get("SMCLI_PROBE_CUDA") == "1"


def resolve_device(name: str, note: Callable[[str], None] = lambda text: None) -> str:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> a usable device string, else UsageError.

    'cpu' and 'auto' without an NVIDIA driver never import torch. 'auto' with a driver but no
    torch installed scores on the CPU and says so through `note` (once per call).
    """
    if name == "auto":
        if not cuda_may_be_present():
            return "cpu"
        try:
            import torch
        except ImportError:  # the CPU user's install: no torch, so no CUDA either
            note(f"an NVIDIA driver is present but PyTorch is not: scoring on the CPU ({TORCH_EXTRA})")
            return "cpu"
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return "cpu"
    if name == "cuda" or name.startswith("cuda:"):
        torch = require_torch(f"--device {name}")
        if not torch.cuda.is_available():
            raise UsageError(f"device {name!r} requested but CUDA is not available on this machine")
        index = name.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise UsageError(f"device {name!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
        return name
    raise UsageError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N")


def geometry_warnings(bag: Bag, geometry: Geometry, cells: np.ndarray, n_edges: int) -> list[str]:
    """Signs of a wrong patch step: patches sharing a cell, or a graph with (almost) no edges."""
    warnings = []
    shared = duplicate_cells(cells)
    if shared:
        warnings.append(
            f"{shared} patches share a grid cell with another patch at patch step "
            f"{geometry.patch_step:g} ({geometry.source})"
        )
    n = bag.n_instances
    if n > 1:
        mean_degree = 2.0 * n_edges / n
        if mean_degree < LOW_MEAN_DEGREE:
            step = infer_patch_step(bag.coords)
            hint = f"; the coords suggest a step of {step:g}" if step is not None else ""
            what = "no edges" if n_edges == 0 else f"mean degree {mean_degree:.2f}"
            warnings.append(
                f"graph has {what} at patch step {geometry.patch_step:g} "
                f"({geometry.source}){hint}: check --patch-size"
            )
    return warnings


@dataclass
class PreparedBag:
    """A bag with its graph built: the CPU-side work, done by the reader thread in a batch."""

    bag: Bag
    geometry: Geometry
    dist_thr: float
    cells: np.ndarray
    adjacency: Adjacency
    seconds: float  # spent preparing


def prepare_bag(model: ScoringModel, bag: Bag, options: ScoreOptions = ScoreOptions()) -> PreparedBag:
    """Check the bag against the model and build its graph. Raises BagError."""
    started = time.perf_counter()
    if bag.features.shape[1] != model.in_dim:
        raise BagError(
            f"{bag.path}: features have {bag.features.shape[1]} columns, the model expects {model.in_dim}"
        )
    if bag.feature_peak is not None and bag.feature_peak > model.feature_limit:
        raise BagError(
            f"{bag.path}: features reach |x| = {bag.feature_peak:.3g}; with this model's weights the "
            f"projection overflows float32 beyond {model.feature_limit:.3g} (are the features scaled?)"
        )
    geometry = resolve_geometry(bag, options.patch_size, model.config.patch_size)
    dist_thr = options.dist_thr if options.dist_thr is not None else model.config.dist_thr
    graph = model.config.graph
    try:
        cells = grid_cells_with_origin(bag.coords, geometry.patch_step, graph.origin)
        features = features_array(bag.features) if graph.weights == "feature_distance" else None
        adjacency = build_adjacency_with(cells, dist_thr, graph, features)
    except GraphError as err:
        raise BagError(f"{bag.path}: {err}") from None
    if options.strict:  # a pipeline that must not score Sm-free on a wrong --patch-size
        problems = geometry_warnings(bag, geometry, cells, adjacency.n_edges)
        if geometry.source == "inferred":
            problems.insert(
                0, f"patch step {geometry.patch_step:g} inferred from the coords (give --patch-size)"
            )
        if problems:
            raise BagError(f"{bag.path}: --strict: " + "; ".join(problems))
    return PreparedBag(bag, geometry, dist_thr, cells, adjacency, time.perf_counter() - started)


def features_array(features) -> np.ndarray:
    """Bag features (N, D) as a numpy array (a CPU torch tensor is viewed, bfloat16 widened)."""
    if isinstance(features, np.ndarray):
        return features
    tensor = features.detach().cpu()
    if str(tensor.dtype) == "torch.bfloat16":  # numpy has no bfloat16
        tensor = tensor.float()
    return tensor.numpy()


class ScoringModel(Protocol):
    """What scoring needs of a model: a LoadedModel, or an ensemble of them (smcli.ensemble), which
    also scores a prepared bag itself (`score_prepared`)."""

    @property
    def in_dim(self) -> int: ...

    @property
    def feature_limit(self) -> float: ...

    @property
    def config(self) -> ModelConfig: ...

    @property
    def sha256(self) -> str: ...


@dataclass
class ModelScores:
    """One model's output on one prepared bag."""

    logits: np.ndarray  # (N,) attention logits, float32
    weights: np.ndarray  # (N,) softmax over the bag
    bag_logit: float | None  # None without a head
    probability: float | None
    auroc: float | None  # logits against the bag's instance labels
    device: str


def score_bag(
    model: ScoringModel, bag: Bag | PreparedBag | str | Path, options: ScoreOptions = ScoreOptions()
) -> BagResult:
    """Score one bag (loaded, prepared, or a path to read). Raises BagError for problems with it.

    Returns the per-instance table (INSTANCE_COLUMNS, plus `label` when the bag has labels) and
    the bag's summary row. An ensemble (smcli.ensemble.Ensemble) adds each model's columns.
    """
    if isinstance(bag, (str, Path)):
        bag = load_bag(bag, options.keys)
    prepared = bag if isinstance(bag, PreparedBag) else prepare_bag(model, bag, options)
    started = time.perf_counter() - prepared.seconds
    score_prepared = getattr(model, "score_prepared", None)  # an ensemble scores itself
    if score_prepared is not None:
        result = score_prepared(prepared, options)
    else:
        scores = run_model(cast(LoadedModel, model), prepared, options.device)
        table = instance_table(prepared.bag, scores.logits, scores.weights, options.top_k)
        summary = bag_summary(
            prepared, scores.logits, scores.bag_logit, scores.probability, model.sha256, scores.device
        )
        result = BagResult(summary, table)
    result.summary.seconds = time.perf_counter() - started
    return result


def run_model(model: LoadedModel, prepared: PreparedBag, device: str) -> ModelScores:
    """One model on one prepared bag: logits, weights, bag logit. Raises BagError."""
    from smcli.metrics import auroc
    from smcli.model import SmSolveError

    bag = prepared.bag
    module = model.module.to(device)  # a no-op when the model is there already
    try:
        out = module.attention(bag.features, prepared.adjacency, symmetric=True)  # symmetric by construction
    except SmSolveError as err:
        raise BagError(f"{bag.path}: {err}") from None
    logits = module.backend.to_numpy(out.attention_logit)
    check_finite_scores(bag.path, logits, out.bag_logit)
    return ModelScores(
        logits=logits,
        weights=softmax_weights(logits),
        bag_logit=out.bag_logit,
        probability=None if out.bag_logit is None else sigmoid(out.bag_logit),
        auroc=auroc(logits, bag.labels) if bag.labels is not None else None,
        device=module.device,
    )


def instance_table(
    bag: Bag,
    logits: np.ndarray,
    weights: np.ndarray,
    top_k: int | None = None,
    more: dict[str, np.ndarray] | None = None,
):
    """The per-instance pyarrow Table: INSTANCE_COLUMNS, then `more` columns (N,) each, then `label`.

    With top_k, the K highest logits, highest first (ties in instance order).
    """
    import pyarrow as pa

    columns = {
        "bag_id": _repeated_string(bag.bag_id, bag.n_instances),
        "instance": _arrow_column(np.arange(bag.n_instances, dtype=np.int64)),
        "x": _arrow_column(bag.coords[:, 0]),
        "y": _arrow_column(bag.coords[:, 1]),
        "attention_logit": _arrow_column(logits),
        "attention_weight": _arrow_column(weights),
    }
    for name, values in (more or {}).items():
        columns[name] = _arrow_column(values)
    if bag.labels is not None:
        columns["label"] = _arrow_column(bag.labels)
    table = pa.Table.from_arrays(list(columns.values()), names=list(columns))
    if top_k is not None:
        # stable sort on -logit keeps equal logits in instance order
        table = table.take(_arrow_column(np.argsort(-logits, kind="stable")[:top_k]))
    return table


def bag_summary(
    prepared: PreparedBag,
    logits: np.ndarray,
    bag_logit: float | None,
    probability: float | None,
    model_sha256: str,
    device: str,
) -> BagSummary:
    """The bag's `_bags.csv` row; `auroc` ranks `logits` (N,) against the instance labels."""
    import datetime

    from smcli import __version__
    from smcli.metrics import auroc

    bag, geometry, cells, adjacency = prepared.bag, prepared.geometry, prepared.cells, prepared.adjacency
    return BagSummary(
        bag_id=bag.bag_id,
        path=str(bag.path),
        n_instances=bag.n_instances,
        n_edges=adjacency.n_edges,
        logit=bag_logit,
        probability=probability,
        patch_step=geometry.patch_step,
        patch_step_source=geometry.source,
        coords_units=bag_units(bag),
        dist_thr=prepared.dist_thr,
        warnings=geometry_warnings(bag, geometry, cells, adjacency.n_edges),
        auroc=auroc(logits, bag.labels) if bag.labels is not None else None,
        input_bytes=_file_size(bag.path),
        model_sha256=model_sha256,
        device=device,
        smcli_version=__version__,
        scored_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def bag_units(bag: Bag) -> str:
    """The unit of the bag's coords (smcli.units): what its reader or metadata says, else pixels.

    A unit smcli does not know is kept as written (scoring does not need it; drawing it on a slide
    then fails with a line naming it).
    """
    from smcli.readers import COORDS_UNITS
    from smcli.units import parse_units

    stated = bag.metadata.get("coords_units") or COORDS_UNITS.get(bag.metadata.get("format", ""))
    try:
        return parse_units(stated)
    except BagError:
        return str(stated)


def check_finite_scores(path: Path, logits: np.ndarray, bag_logit: float | None) -> None:
    """A NaN or inf attention or bag logit (float32 overflow somewhere) is that bag's error, never
    a row of NaNs or a probability of 1.0 reported ok."""
    bad = int(np.count_nonzero(~np.isfinite(logits)))
    if bad:
        raise BagError(
            f"{path}: {bad} of {logits.shape[0]} attention logits are not finite (NaN or inf): "
            "the features or weights overflow float32"
        )
    if bag_logit is not None and not math.isfinite(bag_logit):
        raise BagError(f"{path}: the bag logit is not finite ({bag_logit}): float32 overflow")


def softmax_weights(logits: np.ndarray) -> np.ndarray:
    """Attention weights (N,) from logits (N,): softmax, shifted by the maximum, in the logits' dtype."""
    shifted = np.exp(logits - logits.max())
    return shifted / shifted.sum(dtype=shifted.dtype)


def sigmoid(logit: float) -> float:
    """1 / (1 + exp(-x)) in float64, without overflow for large |x|."""
    if logit >= 0:
        return 1.0 / (1.0 + math.exp(-logit))
    small = math.exp(logit)
    return small / (1.0 + small)


# Arrow arrays straight from numpy buffers: pa.array() would import pandas (0.25 s) to check
# whether it was handed a pandas object, and `smcli score` never needs pandas.


def _arrow_column(values: np.ndarray):
    import pyarrow as pa

    values = np.ascontiguousarray(values)
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)])


def _repeated_string(value: str, n: int):
    import pyarrow as pa

    data = value.encode("utf-8", "surrogateescape")
    offsets = np.array([0, len(data)], dtype=np.int32)
    one = pa.Array.from_buffers(pa.string(), 1, [None, pa.py_buffer(offsets), pa.py_buffer(data)])
    return one.take(_arrow_column(np.zeros(n, dtype=np.int64)))


def _file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def failed(path: Path, error: SmcliError | str, bag_id: str | None = None) -> BagResult:
    return BagResult(BagSummary(bag_id=bag_id or path.stem, path=str(path), status="error", error=str(error)))


def unexpected(path: Path, err: Exception) -> BagError:
    """The last line of defence: an exception no check foresaw becomes that bag's one-line error."""
    detail = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
    return BagError(f"{path}: unexpected {type(err).__name__}" + (f" ({detail})" if detail else ""))


class _ReadAhead:
    """Runs one read on a daemon thread. Not a ThreadPoolExecutor: its worker is joined at exit,
    so a read stuck in the kernel (a hung network mount) would keep SIGINT/SIGTERM from ending
    the run; a daemon thread is simply abandoned."""

    def __init__(self, read: Callable[[Path], Any], path: Path) -> None:
        self._done = threading.Event()
        self._value: Any = None
        self._read, self._path = read, path
        threading.Thread(target=self._run, name="smcli-reader", daemon=True).start()

    def _run(self) -> None:
        try:
            self._value = self._read(self._path)
        except BaseException as err:  # noqa: BLE001 - handed to the main thread, never lost
            self._value = err
        finally:
            self._done.set()

    def result(self) -> Any:
        self._done.wait()  # interruptible: a signal handler's exception propagates from here
        if isinstance(self._value, BaseException) and not isinstance(self._value, Exception):
            raise self._value
        return self._value


def score_bags(
    paths: Iterable[Path],
    model: ScoringModel,
    options: ScoreOptions = ScoreOptions(),
    precheck: Callable[[Path, str], BagResult | None] | None = None,
) -> Iterator[BagResult]:
    """Score bags one by one, reading the next bag and building its graph while the current one computes.

    `precheck(path, bag_id)` may answer for a bag before it is read (e.g. output already there);
    a bag that cannot be read or scored yields a result with status 'error'; the others go on.
    Every exception from one input (foreseen or not) ends as that input's error row.
    """
    paths = [Path(p) for p in paths]

    def read(path: Path) -> PreparedBag | BagResult | SmcliError:
        try:
            check_input(path)  # before anything opens it: a FIFO must not block the reader
            if precheck is not None:
                answer = precheck(path, peek_bag_id(path))
                if answer is not None:
                    return answer
            return prepare_bag(model, load_bag(path, options.keys), options)
        except SmcliError as err:
            return err
        except Exception as err:  # a bug or an input no check foresaw: that bag's error, not the run's
            return unexpected(path, err)

    if not paths:
        return
    pending = _ReadAhead(read, paths[0])
    for index, path in enumerate(paths):
        loaded = pending.result()
        if index + 1 < len(paths):
            pending = _ReadAhead(read, paths[index + 1])
        if isinstance(loaded, BagResult):
            yield loaded
        elif isinstance(loaded, SmcliError):
            yield failed(path, loaded)
        else:
            try:
                result = score_bag(model, loaded, options)
            except SmcliError as err:
                result = failed(path, err, loaded.bag.bag_id)
            except Exception as err:
                result = failed(path, unexpected(path, err), loaded.bag.bag_id)
            del loaded
            yield result
