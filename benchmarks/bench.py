"""Benchmark smcli against torchmil 1.0.2 in the same run, on synthetic tissue-like bags.

Usage (from the repository root, with the project's virtualenv):

    python benchmarks/bench.py                    # full run: N = 1k, 10k, 50k, 100k (10-13 min, 2 cores)
    python benchmarks/bench.py --quick            # smoke run, under a minute on an idle machine
    python benchmarks/bench.py --sizes 2k,20k --repeats 5 --torchmil-exact-max-n 20000
    python benchmarks/bench.py --configs approx-early,exact-late --batch-bags 100
    python benchmarks/bench.py --device cuda      # smcli only, on the GPU (torchmil is skipped)

The report (markdown) goes to stdout, progress to stderr. Run it on an otherwise idle machine: with
more busy threads than cores, every torch op that uses OpenMP waits for descheduled threads, and
small sparse products get hundreds of times slower (the report prints the load average).

What is measured:

* For every bag size N and every model config (approx/exact x early/mid/late; att_dim 128, gelu,
  trainable alpha with coef = 1.0, 10 Sm steps; same weights), the median over --repeats of:
    - torchmil: grid the coords as its WSI datasets do (coords / patch_size, minus the column
      minimum, astype(int)), `build_adj(cells, None, dist_thr=sqrt 2)` + `normalize_adj`, a
      coalesced `torch.sparse_coo_tensor` cast to float32, then
      `SmAttentionPool.forward(X[None], adj[None], return_att=True)` under `torch.no_grad()`.
      Exact mode gets the same sparse adjacency: torchmil's ExactSm itself builds the dense N x N
      system `(1 + coef) I - coef A` and calls `torch.linalg.solve`, so it only runs up to
      --torchmil-exact-max-n (default 10k).
    - smcli: `grid_cells` + `build_adjacency` + the backend's sparse matrix + `module.attention`,
      the model made by `smcli.checkpoint.build_module` and loaded with the torchmil state dict
      (numpy + scipy.sparse on the CPU: that child never imports torch).
  Each side runs in a fresh child process (this script with a hidden flag) that reads the bag file,
  warms up on its first 512 patches (untimed), then runs the pipeline --repeats times. Peak RSS is
  the child's high-water mark at the end (`VmHWM`; `getrusage(RUSAGE_SELF).ru_maxrss` where /proc
  is missing), which includes the interpreter, the imports and the loaded float32 bag
  (N x 1024 x 4 bytes); in brackets, what the pipeline added over the mark taken right after the
  bag was loaded. Max |delta attention_logit| compares the logits of the two children.
* The floor: `torch.mm(X, W1.T)` alone (N x 1024 by 1024 x 128, float32), timed in the smcli
  child, and smcli's pipeline time as a multiple of it.
* Graph build alone: torchmil grid + build_adj + normalize_adj against smcli grid_cells +
  build_adjacency (the "graph" stage of the pipeline runs above, median over all of them).
* Whole process at the largest N, default config (approx, early): `smcli score BAG -m MODEL -o
  out.csv` against an equivalent torchmil script (load the bag, build the graph, forward, write the
  same CSV with pandas), both as subprocesses, median wall time including start-up and imports;
  and smcli's exact-early (torchmil's dense exact solve cannot run there).
* Start-up: each command (`--help`, `inspect`, `score --device cpu|auto`, `heatmap`) on one
  2,000-patch bag as a whole process, against `python -c "import torch"` and `python -c pass`:
  median wall time, peak RSS, the time in imports (`python -X importtime`) and whether torch was
  imported. Then a shell loop of --loop-bags single-bag `smcli score BAG` processes against one
  `smcli score DIR` over the same bags.
* Threads: smcli's sparse step at the largest N on one thread against its rows split over two.
* Batch: --batch-bags bags x --batch-patches patches x 1024 float16 features in one directory,
  `smcli score DIR -m MODEL -o OUTDIR`, as bags per second (the files are written at the start
  of the run and are normally still in the page cache: this measures smcli, not the disk).

Bags are safetensors files (`features` (N, 1024), `coords` (N, 2) int64, metadata
{"patch_size": "512"}) in a temporary directory, removed at the end. The tissue is a thresholded
multi-scale smoothed random field under an elliptical falloff, minus a few round holes: lobes,
holes, small islands and a ragged border, exactly N patches, fixed by --seed.

The parent process never imports torch: bags, models and machine facts come from a helper child,
so the parent stays small. (A child started by fork/vfork + exec inherits the parent's
high-water RSS in ru_maxrss, which would otherwise inflate the whole-process numbers.)
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PATCH_SIZE = 512
IN_DIM = 1024
ATT_DIM = 128
DIST_THR = math.sqrt(2.0)
DEFAULT_SIZES = "1k,10k,50k,100k"
QUICK_SIZES = "1k,5k"
ALL_CONFIGS = [f"{mode}-{where}" for mode in ("approx", "exact") for where in ("early", "mid", "late")]
QUICK_CONFIGS = ["approx-early", "approx-late", "exact-mid"]
WHOLE_PROCESS_CONFIG = "approx-early"  # smcli's and torchmil's defaults
EXACT_WHOLE_PROCESS_CONFIG = "exact-early"
WARMUP_PATCHES = 512
DENSE_COPIES = 3  # N x N float32 matrices alive in torchmil's ExactSm: eye, the system, solve's LU


# ============================================================================================
# Helper-child tasks (they import torch; the parent does not)
# ============================================================================================

# --- synthetic bags -------------------------------------------------------------------------


def tissue_cells(n: int, seed: int) -> np.ndarray:
    """(n, 2) int64 grid cells (x, y) of a tissue-like region holding exactly n patches.

    The region is the top-n cells of a field: coarse smoothed noise (lobes) + medium noise + a
    little cell-scale noise (ragged border, islands) - an elliptical falloff - a few Gaussian dips
    (holes). Cells come out in raster order, as patch extractors usually write them.
    """
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    side = int(math.ceil(math.sqrt(n / 0.4)))  # the tissue fills ~40% of the canvas
    height, width = side, int(side * 1.4)

    def smooth_noise(sigma: float) -> np.ndarray:
        noise = ndimage.gaussian_filter(rng.standard_normal((height, width)), sigma=sigma)
        return noise / noise.std()

    yy, xx = np.mgrid[0:height, 0:width]
    falloff = ((yy - height / 2) / (height / 2)) ** 2 + ((xx - width / 2) / (width / 2)) ** 2
    density = smooth_noise(side / 8) + 0.4 * smooth_noise(side / 40) + 0.08 * smooth_noise(1.0)
    density -= 2.5 * falloff
    for _ in range(int(rng.integers(3, 8))):
        cy, cx = rng.uniform(0.25, 0.75) * height, rng.uniform(0.25, 0.75) * width
        radius = rng.uniform(0.02, 0.06) * side
        density -= 4.0 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
    chosen = np.sort(np.argsort(-density.ravel(), kind="stable")[:n])
    rows, cols = np.unravel_index(chosen, (height, width))
    return np.stack([cols, rows], axis=1).astype(np.int64)


def write_bag(path: str, n: int, seed: int, dtype: str = "float32") -> None:
    """A safetensors bag: random features (n, IN_DIM), level-0 coords on a PATCH_SIZE grid."""
    import torch
    from safetensors.torch import save_file

    rng = np.random.default_rng(seed + 1_000_003)
    origin = rng.integers(0, 40_000, size=2)  # not a multiple of the patch size, as in real slides
    coords = tissue_cells(n, seed) * PATCH_SIZE + origin
    features = rng.standard_normal((n, IN_DIM), dtype=np.float32).astype(dtype)
    save_file(
        {"features": torch.from_numpy(features), "coords": torch.from_numpy(coords)},
        path,
        metadata={"patch_size": str(PATCH_SIZE)},
    )


def task_bags(spec: dict) -> None:
    """Write bags [{path, n, seed, dtype}]."""
    for bag in spec["bags"]:
        write_bag(bag["path"], bag["n"], bag["seed"], bag.get("dtype", "float32"))


# --- models -----------------------------------------------------------------------------------


def pool_kwargs(config: str) -> dict:
    """SmAttentionPool constructor arguments of a config name like 'approx-early'."""
    mode, where = config.split("-")
    return dict(
        in_dim=IN_DIM,
        att_dim=ATT_DIM,
        act="gelu",
        sm_mode=mode,
        sm_alpha="trainable",
        sm_steps=10,
        sm_where=where,
        spectral_norm=False,
    )


def task_models(spec: dict) -> dict:
    """Seeded torchmil SmAttentionPool weights (coef stays at its initial 1.0), saved as one smcli
    checkpoint per config plus `torchmil.pt` (torch.save'd state dict) for the torchmil script."""
    import torch

    from smcli.checkpoint import ModelConfig, PoolConfig, save_checkpoint

    torch.manual_seed(spec["seed"])
    try:
        from torchmil.nn.attention.sm_attention_pool import SmAttentionPool
    except ImportError:  # e.g. a GPU box without the test extras: same keys, same init scheme
        from smcli.model import SmAttentionPool
    module = SmAttentionPool(**pool_kwargs(WHOLE_PROCESS_CONFIG))
    state = {key: value.detach().clone() for key, value in module.state_dict().items()}
    directory = Path(spec["dir"])
    torch.save(state, directory / "torchmil.pt")
    paths = {}
    for config in spec["configs"]:
        path = directory / f"model-{config}.safetensors"
        save_checkpoint(state, ModelConfig(PoolConfig(**pool_kwargs(config))), path)
        paths[config] = str(path)
    return paths


# --- machine facts ----------------------------------------------------------------------------


def task_info(spec: dict) -> dict:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    info = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    try:
        from importlib.metadata import PackageNotFoundError, version

        info["torchmil"] = version("torchmil")
    except PackageNotFoundError:
        info["torchmil"] = None
    if spec["device"].startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(spec["device"])
    return info


# --- one measurement: one side, one bag, one config -------------------------------------------


def peak_rss_mib() -> float:
    """This process's resident high-water mark in MiB.

    VmHWM belongs to the current address space only; ru_maxrss also carries the parent's
    high-water mark across fork + exec, so it is the fallback where /proc is missing.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


class StageClock:
    """Wall time per named stage of one pipeline run."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.stages: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, stage: str) -> None:
        synchronize(self.device)
        now = time.perf_counter()
        self.stages[stage] = now - self._last
        self._last = now


def load_bag_file(path: str, side: str):
    """features (float32: a torch tensor for torchmil, numpy for smcli), coords (numpy), patch_size."""
    if side == "torchmil":
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            features = handle.get_tensor("features").float()
            coords = handle.get_tensor("coords").numpy()
            patch_size = float(handle.metadata()["patch_size"])
        return features, coords, patch_size
    from smcli.tensorfile import read_safetensors

    read = read_safetensors(path)
    features = np.asarray(read.tensors["features"], dtype=np.float32)
    return features, np.asarray(read.tensors["coords"]), float(read.metadata["patch_size"])


def torchmil_runner(spec: dict):
    """torchmil's module with the checkpoint's weights; returns (run, None)."""
    import torch
    from safetensors.torch import load_file
    from torchmil.nn.attention.sm_attention_pool import SmAttentionPool
    from torchmil.utils import build_adj, normalize_adj

    module = SmAttentionPool(**spec["pool"])
    module.load_state_dict(load_file(spec["model"]), strict=True)
    module.eval()

    def run(features, coords, patch_size, clock):
        n = coords.shape[0]
        cells = coords / patch_size  # as torchmil's WSI datasets grid their coords
        cells = (cells - cells.min(axis=0)).astype(int)
        edge_index, edge_weight = build_adj(cells, None, dist_thr=DIST_THR)
        weight = normalize_adj(edge_index, edge_weight, n_nodes=n)
        clock.mark("graph")
        adj = torch.sparse_coo_tensor(edge_index, weight, (n, n)).coalesce().to(torch.float32)
        clock.mark("tensor")
        with torch.no_grad():
            _, logits = module(features[None], adj[None], return_att=True)
        clock.mark("model")
        return logits[0]

    return run, None


def smcli_runner(spec: dict):
    """smcli's model (build_module + the same state dict, numpy on the CPU: no torch import);
    returns (run, proj1 weight)."""
    from smcli.checkpoint import ModelConfig, PoolConfig, build_module
    from smcli.graph import DEFAULT_DIST_THR, build_adjacency, grid_cells
    from smcli.model import SmGraph
    from smcli.tensorfile import read_safetensors

    device = spec["device"]
    module = build_module(ModelConfig(PoolConfig(**spec["pool"])))
    module.load_state_dict(read_safetensors(spec["model"]).tensors, strict=True)
    module = module.to(device)

    def run(features, coords, patch_size, clock):
        adjacency = build_adjacency(grid_cells(coords, patch_size), DEFAULT_DIST_THR)
        clock.mark("graph")
        graph = SmGraph(adjacency.to_scipy(), module.backend, symmetric=True)
        graph.matrix(module.backend.xp.float32)  # the backend's sparse matrix, made once
        clock.mark("tensor")
        logits = module.attention(features, graph).attention_logit
        clock.mark("model")
        return logits

    return run, module.weight("proj1")


def time_floor(features, weight, repeats: int, device: str) -> float:
    """Median time of the unavoidable projection X @ W1.T (float32), on the side's own arrays."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        features @ weight.T
        synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def as_numpy(array) -> np.ndarray:
    """numpy, or a torch tensor on any device, as a float32 numpy array."""
    if hasattr(array, "detach"):
        array = array.detach().float().cpu().numpy()
    return np.asarray(array, dtype=np.float32)


def task_measure(spec: dict) -> dict:
    """Run one side --repeats times on one bag, after an untimed warm-up on its first patches.

    The smcli side on the CPU never imports torch (its RSS and start-up are numpy's).
    """
    device = spec["device"]
    uses_torch = spec["side"] == "torchmil" or device != "cpu"
    if uses_torch:
        import torch

        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
    make_runner = torchmil_runner if spec["side"] == "torchmil" else smcli_runner
    run, weight = make_runner(spec)  # imports and the model come before the bag
    features, coords, patch_size = load_bag_file(spec["bag"], spec["side"])
    if device != "cpu":
        features = torch.from_numpy(features).to(device)
        weight = torch.from_numpy(weight).to(device)
    synchronize(device)
    rss_loaded = peak_rss_mib()
    run(features[:WARMUP_PATCHES], coords[:WARMUP_PATCHES], patch_size, StageClock(device))

    runs, logits = [], None
    for _ in range(spec["repeats"]):
        clock = StageClock(device)
        logits = as_numpy(run(features, coords, patch_size, clock))
        runs.append(clock.stages)
    rss_peak = peak_rss_mib()
    np.save(spec["logits_out"], logits)

    result = {
        "total": statistics.median(sum(stages.values()) for stages in runs),
        "stages": {name: [stages[name] for stages in runs] for name in runs[0]},
        "rss_loaded_mib": rss_loaded,
        "rss_peak_mib": rss_peak,
    }
    if device.startswith("cuda"):
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if spec.get("floor") and weight is not None:
        result["floor"] = time_floor(features, weight, spec["repeats"], device)
    return result


def task_sparse(spec: dict) -> dict:
    """smcli's CPU sparse product (scipy's CSR kernel, in place) on one thread against its rows split
    over 2 threads (scipy's kernels release the GIL): does threading pay for Sm's product at the
    largest N (att_dim + 1 = 129 float32 columns)?"""
    from smcli.backends.cpu import CpuBackend
    from smcli.graph import DEFAULT_DIST_THR, build_adjacency

    cells = tissue_cells(spec["n"], spec["seed"])
    host = build_adjacency(cells, DEFAULT_DIST_THR).to_scipy()
    n, columns = host.shape[0], ATT_DIM + 1
    x = np.random.default_rng(0).standard_normal((n, columns)).astype(np.float32)
    out = np.empty_like(x)
    result = {"n": n, "columns": columns, "nnz": int(host.nnz)}
    for name, threads in (("one_thread", 1), ("two_threads", 2)):
        backend = CpuBackend(threads=threads)
        matrix = backend.sparse(host, np.float32)
        backend.addmm(x, matrix, x, beta=0.5, alpha=0.5, out=out)
        times = []
        for _ in range(max(5, spec["repeats"])):
            started = time.perf_counter()
            backend.addmm(x, matrix, x, beta=0.5, alpha=0.5, out=out)
            times.append(time.perf_counter() - started)
        result[name] = statistics.median(times)
    return result


def task_prepare(spec: dict) -> dict:
    """Everything before the measurements, in one child: machine facts, models, all bag files."""
    info = task_info(spec)
    models = task_models(spec)
    task_bags(spec)
    return {"info": info, "models": models}


TASKS = {"prepare": task_prepare, "measure": task_measure, "sparse": task_sparse}


# ============================================================================================
# Parent: orchestration (numpy and the standard library only)
# ============================================================================================


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def run_task(spec: dict) -> dict:
    """Run a helper task in a fresh child (this script, hidden --_task flag); its JSON result."""
    command = [sys.executable, str(Path(__file__).resolve()), "--_task", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"task {spec['task']} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@dataclass
class SideResult:
    """One measuring child's numbers (seconds, MiB) and its attention logits."""

    total: float
    stages: dict[str, list[float]]
    rss_loaded_mib: float
    rss_peak_mib: float
    logits: np.ndarray
    floor: float | None = None
    cuda_peak_mib: float | None = None


def measure_side(spec: dict, workdir: Path) -> SideResult:
    logits_path = workdir / f"logits-{spec['side']}.npy"
    result = run_task(dict(spec, task="measure", logits_out=str(logits_path)))
    logits = np.load(logits_path)
    logits_path.unlink()
    return SideResult(logits=logits, **result)


@dataclass
class Row:
    n: int
    config: str
    smcli: SideResult
    torchmil: SideResult | None = None
    skip_reason: str = ""

    @property
    def max_delta(self) -> float | None:
        if self.torchmil is None:
            return None
        return float(np.max(np.abs(self.torchmil.logits.astype(np.float64) - self.smcli.logits)))


def dense_gib(n: int) -> float:
    return DENSE_COPIES * n * n * 4 / 2**30


def measure_size(n: int, bag: Path, models: dict[str, str], args, workdir: Path) -> list[Row]:
    """Every config at one bag size, each side in its own child."""
    rows = []
    for index, config in enumerate(args.configs):
        spec = {
            "bag": str(bag),
            "model": models[config],
            "pool": pool_kwargs(config),
            "repeats": args.repeats,
            "device": args.device,
            "threads": args.threads,
        }
        row = Row(n, config, measure_side(dict(spec, side="smcli", floor=index == 0), workdir))
        if args.device != "cpu":
            row.skip_reason = f"skipped (--device {args.device})"
        elif config.startswith("exact") and n > args.torchmil_exact_max_n:
            row.skip_reason = f"skipped (dense N×N would need ~{dense_gib(n):.1f} GiB)"
        else:
            row.torchmil = measure_side(dict(spec, side="torchmil"), workdir)
        rows.append(row)
        theirs = f"{row.torchmil.total:.3f} s" if row.torchmil else row.skip_reason
        log(f"N={n} {config}: smcli {row.smcli.total:.3f} s, torchmil {theirs}")
    return rows


# --- subprocess timing --------------------------------------------------------------------------


def timed_process(command: list[str], workdir: Path, output: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB, from wait4) of one subprocess; raise if it fails.

    `output` (a file or directory the command writes) and its `<stem>_bags.csv` sibling are
    removed first, so every run starts from the same state.
    """
    for stale in (output, output.with_name(f"{output.stem}_bags.csv")):
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    out_path, err_path = workdir / "proc.out", workdir / "proc.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        tail = err_path.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{tail}")
    return wall, usage.ru_maxrss / 1024.0


def smcli_command() -> list[str]:
    """The installed `smcli` entry point beside this interpreter, else `python -m smcli`."""
    script = Path(sys.executable).with_name("smcli")
    return [str(script)] if script.exists() else [sys.executable, "-m", "smcli"]


def read_csv_column(path: Path, column: str) -> list[str]:
    with open(path, newline="") as handle:
        return [record[column] for record in csv.DictReader(handle)]


TORCHMIL_SCRIPT = '''\
"""torchmil 1.0.2 end to end: bag file -> per-patch attention CSV (the benchmark's reference)."""
import sys

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from torchmil.nn.attention.sm_attention_pool import SmAttentionPool
from torchmil.utils import build_adj, normalize_adj

bag_path, model_path, out_path = sys.argv[1:4]
with safe_open(bag_path, framework="pt") as handle:
    X = handle.get_tensor("features").float()
    coords = handle.get_tensor("coords").numpy()
    patch_size = float(handle.metadata()["patch_size"])
model = SmAttentionPool(**{pool!r})
model.load_state_dict(torch.load(model_path, weights_only=True))
model.eval()
n = coords.shape[0]
cells = coords / patch_size
cells = (cells - cells.min(axis=0)).astype(int)
edge_index, edge_weight = build_adj(cells, None, dist_thr={dist_thr!r})
weight = normalize_adj(edge_index, edge_weight, n_nodes=n)
adj = torch.sparse_coo_tensor(edge_index, weight, (n, n)).coalesce().to(torch.float32)
with torch.no_grad():
    _, f = model(X[None], adj[None], return_att=True)
f = f[0]
pd.DataFrame({{
    "bag_id": bag_path.rsplit("/", 1)[-1].removesuffix(".safetensors"),
    "instance": np.arange(n),
    "x": coords[:, 0],
    "y": coords[:, 1],
    "attention_logit": f.numpy(),
    "attention_weight": torch.softmax(f, dim=0).numpy(),
}}).to_csv(out_path, index=False)
'''


@dataclass
class WholeProcess:
    n: int
    smcli_s: float
    smcli_rss: float
    torchmil_s: float | None = None
    torchmil_rss: float | None = None
    max_delta: float | None = None
    exact_s: float | None = None
    exact_rss: float | None = None


def measure_whole_process(n: int, bag: Path, models: dict[str, str], args, workdir: Path) -> WholeProcess:
    """`smcli score BAG` against the torchmil script, median wall time over --repeats; smcli's exact
    mode too (torchmil's dense exact solve cannot run at this N)."""
    smcli_csv, torchmil_csv = workdir / "smcli.csv", workdir / "torchmil.csv"

    def smcli_run(config: str) -> tuple[float, float]:
        command = smcli_command() + [
            "score",
            str(bag),
            "-m",
            models[config],
            "-o",
            str(smcli_csv),
            "--device",
            args.device,
        ]
        runs = [timed_process(command, workdir, smcli_csv) for _ in range(args.repeats)]
        return statistics.median(w for w, _ in runs), max(r for _, r in runs)

    result = WholeProcess(n, *smcli_run(EXACT_WHOLE_PROCESS_CONFIG))
    result.exact_s, result.exact_rss = result.smcli_s, result.smcli_rss
    result.smcli_s, result.smcli_rss = smcli_run(WHOLE_PROCESS_CONFIG)
    log(f"whole process N={n}: smcli {result.smcli_s:.2f} s, exact {result.exact_s:.2f} s")
    if args.device != "cpu":
        return result

    script = workdir / "torchmil_score.py"
    script.write_text(TORCHMIL_SCRIPT.format(pool=pool_kwargs(WHOLE_PROCESS_CONFIG), dist_thr=DIST_THR))
    torchmil_cmd = [sys.executable, str(script), str(bag), str(workdir / "torchmil.pt"), str(torchmil_csv)]
    runs = [timed_process(torchmil_cmd, workdir, torchmil_csv) for _ in range(args.repeats)]
    result.torchmil_s = statistics.median(w for w, _ in runs)
    result.torchmil_rss = max(r for _, r in runs)
    ours = np.array(read_csv_column(smcli_csv, "attention_logit"), dtype=np.float64)
    theirs = np.array(read_csv_column(torchmil_csv, "attention_logit"), dtype=np.float64)
    if ours.shape == theirs.shape:
        result.max_delta = float(np.max(np.abs(ours - theirs)))
    log(f"whole process N={n}: torchmil {result.torchmil_s:.2f} s")
    return result


# --- start-up: what one invocation costs before any math --------------------------------------


@dataclass
class StartupRow:
    label: str
    wall_s: float  # median whole-process wall time
    rss_mib: float
    import_s: float  # time in imports (-X importtime, top-level cumulative, one run)
    torch: bool  # whether the process imported torch


def import_profile(arguments: list[str], workdir: Path) -> tuple[float, bool]:
    """Seconds spent importing (sum of the top-level cumulative times of `python -X importtime`)
    and whether torch was among the imports, for `python ARGUMENTS`."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *arguments], capture_output=True, text=True, cwd=workdir
    )
    total_us, torch_seen = 0, False
    for line in done.stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if not line.startswith("import time:") or len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        name = parts[2]
        torch_seen = torch_seen or name.strip() == "torch"
        if len(name) - len(name.lstrip()) == 1:  # one space: a top-level import (nested ones indent)
            total_us += int(parts[1])
    return total_us / 1e6, torch_seen


def measure_startup(bag: Path, models: dict[str, str], args, workdir: Path) -> list[StartupRow]:
    """Whole-process wall time, import time and RSS of each command on one small bag."""
    out_csv, out_png = workdir / "startup.csv", workdir / "startup.png"
    model = models[WHOLE_PROCESS_CONFIG]
    score = ["score", str(bag), "-m", model, "-o", str(out_csv)]
    cases = [
        ("python -c pass", ["-c", "pass"], None),
        ("python -c 'import torch'", ["-c", "import torch"], None),
        ("smcli --help", ["--help"], "smcli"),
        ("smcli inspect BAG", ["inspect", str(bag)], "smcli"),
        ("smcli score BAG --device cpu", [*score, "--device", "cpu"], "smcli"),
        ("smcli score BAG (--device auto)", score, "smcli"),
        ("smcli heatmap BAG -m MODEL", ["heatmap", str(bag), "-m", model, "-o", str(out_png)], "smcli"),
    ]
    if args.device != "cpu":
        cases.append(("smcli score BAG --device " + args.device, [*score, "--device", args.device], "smcli"))
    rows = []
    for label, arguments, program in cases:
        wall_command = smcli_command() + arguments if program else [sys.executable, *arguments]
        output = out_png if "heatmap" in label else out_csv
        try:
            runs = [timed_process(wall_command, workdir, output) for _ in range(args.repeats)]
        except RuntimeError as err:  # e.g. heatmap without its extra: say so, measure the rest
            log(f"start-up {label}: skipped ({str(err).splitlines()[-1][:120]})")
            continue
        import_s, torch_seen = import_profile(["-m", "smcli", *arguments] if program else arguments, workdir)
        rows.append(
            StartupRow(
                label, statistics.median(w for w, _ in runs), max(r for _, r in runs), import_s, torch_seen
            )
        )
        log(f"start-up {label}: {rows[-1].wall_s:.2f} s (imports {import_s:.2f} s, torch {torch_seen})")
    return rows


def startup_lines(rows: list[StartupRow], patches: int) -> list[str]:
    if not rows:
        return []
    torch_wall = next((row.wall_s for row in rows if "import torch" in row.label), None)
    lines = [
        "",
        f"Start-up, one process per command, median of its runs (BAG: {patches} patches × {IN_DIM} float16):",
        "",
        "| command | wall s | imports s | peak RSS MiB | imports torch | wall / `import torch` |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for row in rows:
        ratio = f"{row.wall_s / torch_wall:.2f}" if torch_wall else "—"
        lines.append(
            f"| {row.label} | {seconds(row.wall_s)} | {seconds(row.import_s)} | {row.rss_mib:.0f} "
            f"| {'yes' if row.torch else 'no'} | {ratio} |"
        )
    return lines


@dataclass
class LoopResult:
    bags: int
    patches: int
    loop_s: float  # one `smcli score BAG` process per bag, one after the other
    directory_s: float  # one `smcli score DIR` process for the same bags
    directory_rss: float


def measure_loop(models: dict[str, str], args, workdir: Path) -> LoopResult:
    """A shell loop of single-bag invocations against one directory run over the same bags."""
    bags = sorted(batch_dir(workdir).glob("*.safetensors"))[: args.loop_bags]
    subset, loop_out, dir_out = workdir / "loop-bags", workdir / "loop-out", workdir / "loop-dir-out"
    subset.mkdir()
    loop_out.mkdir()
    for bag in bags:
        (subset / bag.name).symlink_to(bag)
    model = models[WHOLE_PROCESS_CONFIG]
    started = time.perf_counter()
    for bag in bags:
        command = smcli_command() + [
            "score",
            str(bag),
            "-m",
            model,
            "-o",
            str(loop_out / f"{bag.stem}.csv"),
            "--device",
            args.device,
        ]
        subprocess.run(command, check=True, capture_output=True)
    loop_s = time.perf_counter() - started
    command = smcli_command() + [
        "score",
        str(subset),
        "-m",
        model,
        "-o",
        str(dir_out),
        "--device",
        args.device,
    ]
    directory_s, rss = timed_process(command, workdir, dir_out)
    log(f"loop of {len(bags)}: {loop_s:.1f} s; one directory run: {directory_s:.1f} s")
    for path in (subset, loop_out, dir_out):
        shutil.rmtree(path)
    return LoopResult(len(bags), args.batch_patches, loop_s, directory_s, rss)


def loop_line(result: LoopResult) -> str:
    return (
        f"- {result.bags} bags × {result.patches} patches: a loop of single-bag `smcli score BAG` "
        f"processes {seconds(result.loop_s)} s ({seconds(result.loop_s / result.bags)} s per bag); "
        f"one `smcli score DIR` {seconds(result.directory_s)} s "
        f"({seconds(result.directory_s / result.bags)} s per bag, "
        f"peak RSS {result.directory_rss:.0f} MiB)"
    )


def sparse_line(result: dict) -> str:
    gain = result["one_thread"] / result["two_threads"]
    return (
        f"- Sm's sparse step g = b·f + a·A·g at N={result['n']} ({result['nnz']} non-zeros × "
        f"{result['columns']} float32 columns, scipy's CSR kernel, in place): one thread "
        f"{seconds(result['one_thread'] * 1000)} ms, rows split over 2 threads "
        f"{seconds(result['two_threads'] * 1000)} ms ({gain:.2f}×)"
    )


@dataclass
class BatchResult:
    bags: int
    patches: int
    wall_s: float
    rss_mib: float
    scoring_s: float  # sum of the per-bag `seconds` column of _bags.csv
    ok: int


def measure_batch(models: dict[str, str], args, workdir: Path) -> BatchResult:
    """`smcli score DIR -m MODEL -o OUTDIR` on the directory of float16 bags `prepare` wrote."""
    bag_dir, out_dir = batch_dir(workdir), workdir / "batch-out"
    command = smcli_command() + [
        "score",
        str(bag_dir),
        "-m",
        models[WHOLE_PROCESS_CONFIG],
        "-o",
        str(out_dir),
        "--device",
        args.device,
    ]
    wall, rss = timed_process(command, workdir, out_dir)
    statuses = read_csv_column(out_dir / "_bags.csv", "status")
    scoring = sum(float(s) for s in read_csv_column(out_dir / "_bags.csv", "seconds"))
    result = BatchResult(args.batch_bags, args.batch_patches, wall, rss, scoring, statuses.count("ok"))
    log(f"batch: {result.bags / wall:.1f} bags/s")
    shutil.rmtree(bag_dir)
    shutil.rmtree(out_dir)
    return result


# --- report -------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown cpu"


def machine_line(info: dict) -> str:
    parts = [
        f"cpu: {cpu_model()}",
        f"cores: {os.cpu_count()}",
        f"torch {info['torch']}",
        f"torch threads: {info['threads']}",
        f"torchmil {info['torchmil'] or 'not installed'}",
    ]
    if info.get("gpu"):
        parts.append(f"gpu: {info['gpu']}")
    return "machine: " + ", ".join(parts)


def seconds(value: float) -> str:
    return f"{value:.3g}" if value < 1000 else f"{value:.0f}"


def rss_cell(side: SideResult) -> str:
    cell = f"{side.rss_peak_mib:.0f} (+{side.rss_peak_mib - side.rss_loaded_mib:.0f})"
    if side.cuda_peak_mib is not None:
        cell += f", GPU {side.cuda_peak_mib:.0f}"
    return cell


def main_table(rows: list[Row]) -> list[str]:
    header = [
        "N",
        "config",
        "torchmil s",
        "smcli s",
        "ratio",
        "torchmil peak RSS MiB",
        "smcli peak RSS MiB",
        "max abs Δ logit",
    ]
    lines = ["| " + " | ".join(header) + " |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if row.torchmil is None:
            theirs, ratio, theirs_rss, delta = row.skip_reason, "—", "—", "—"
        else:
            theirs = seconds(row.torchmil.total)
            ratio = f"{row.torchmil.total / row.smcli.total:.1f}×"
            theirs_rss = rss_cell(row.torchmil)
            delta = f"{row.max_delta:.2e}"
        lines.append(
            f"| {row.n} | {row.config} | {theirs} | {seconds(row.smcli.total)} | {ratio} "
            f"| {theirs_rss} | {rss_cell(row.smcli)} | {delta} |"
        )
    return lines


def median_stage(sides: list[SideResult], stage: str) -> float:
    return statistics.median(t for side in sides for t in side.stages[stage])


def sizes_of(rows: list[Row]) -> list[int]:
    return sorted({row.n for row in rows})


def floor_lines(rows: list[Row]) -> list[str]:
    lines = []
    for n in sizes_of(rows):
        at_n = [row for row in rows if row.n == n]
        floor = next(row.smcli.floor for row in at_n if row.smcli.floor is not None)
        multiples = ", ".join(f"{row.config} {row.smcli.total / floor:.1f}×" for row in at_n)
        lines.append(
            f"- floor N={n}: X @ W1.T ({n}×{IN_DIM} · {IN_DIM}×{ATT_DIM} float32) "
            f"{seconds(floor)} s; smcli pipeline = {multiples} the floor"
        )
    return lines


def graph_lines(rows: list[Row]) -> list[str]:
    lines = []
    for n in sizes_of(rows):
        at_n = [row for row in rows if row.n == n]
        ours = median_stage([row.smcli for row in at_n], "graph")
        ours_tensor = median_stage([row.smcli for row in at_n], "tensor")
        line = (
            f"- graph build N={n}: smcli grid_cells+build_adjacency {seconds(ours)} s "
            f"(then the backend's sparse matrix {seconds(ours_tensor)} s)"
        )
        theirs = [row.torchmil for row in at_n if row.torchmil is not None]
        if theirs:
            graph, tensor = median_stage(theirs, "graph"), median_stage(theirs, "tensor")
            line += (
                f"; torchmil grid+build_adj+normalize_adj {seconds(graph)} s "
                f"(then sparse_coo_tensor.coalesce {seconds(tensor)} s); ratio {graph / ours:.0f}×"
            )
        lines.append(line)
    return lines


def stage_lines(rows: list[Row]) -> list[str]:
    """Where each side's time goes at the largest N (median per stage)."""
    n = sizes_of(rows)[-1]
    lines = [f"- stages at N={n}, median s (graph / tensor / model):"]
    for row in rows:
        if row.n != n:
            continue
        parts = []
        for name, side in (("smcli", row.smcli), ("torchmil", row.torchmil)):
            if side is not None:
                medians = [seconds(statistics.median(side.stages[s])) for s in ("graph", "tensor", "model")]
                parts.append(f"{name} {' / '.join(medians)}")
        lines.append(f"  - {row.config}: " + "; ".join(parts))
    return lines


def whole_process_line(result: WholeProcess) -> str:
    line = (
        f"- whole process N={result.n} ({WHOLE_PROCESS_CONFIG}, CSV out, incl. start-up): "
        f"smcli score {seconds(result.smcli_s)} s (peak RSS {result.smcli_rss:.0f} MiB)"
    )
    if result.torchmil_s is not None:
        line += (
            f"; torchmil script {seconds(result.torchmil_s)} s "
            f"(peak RSS {result.torchmil_rss:.0f} MiB); ratio {result.torchmil_s / result.smcli_s:.1f}×"
        )
        if result.max_delta is not None:
            line += f"; max abs Δ logit between the CSVs {result.max_delta:.2e}"
    if result.exact_s is not None:
        line += (
            f"\n- whole process N={result.n} ({EXACT_WHOLE_PROCESS_CONFIG}): smcli score "
            f"{seconds(result.exact_s)} s (peak RSS {result.exact_rss:.0f} MiB); torchmil cannot "
            f"(dense N×N solve)"
        )
    return line


def batch_line(result: BatchResult) -> str:
    return (
        f"- batch: {result.bags} bags × {result.patches} patches × {IN_DIM} float16, "
        f"`smcli score DIR -o OUTDIR`: {seconds(result.wall_s)} s wall, "
        f"{result.bags / result.wall_s:.1f} bags/s ({result.ok} ok; per-bag scoring time sums to "
        f"{seconds(result.scoring_s)} s; peak RSS {result.rss_mib:.0f} MiB)"
    )


def print_report(args, info: dict, load_before: float, rows, whole, batch, extras=None) -> None:
    lines = [
        machine_line(info),
        f"load average (1 min) at start / end: {load_before:.2f} / {os.getloadavg()[0]:.2f} on "
        f"{os.cpu_count()} cores (other busy processes inflate the times below)",
        "",
        f"Per-bag pipeline (graph + tensor + model), median of {args.repeats}, each side in its own process:",
        "",
    ]
    lines += main_table(rows)
    lines += [
        "",
        "Peak RSS: high-water mark of the measuring child at the end, including interpreter, imports "
        f"and the loaded float32 bag (N×{IN_DIM}×4 B); (+x) = growth after the bag was loaded. "
        f"torchmil exact is skipped above N={args.torchmil_exact_max_n}: its ExactSm keeps "
        f"~{DENSE_COPIES} dense N×N float32 matrices alive.",
        "",
    ]
    lines += floor_lines(rows) + graph_lines(rows) + stage_lines(rows)
    if whole is not None:
        lines.append(whole_process_line(whole))
    if batch is not None:
        lines.append(batch_line(batch))
    extras = extras or {}
    if extras.get("loop") is not None:
        lines.append(loop_line(extras["loop"]))
    if extras.get("sparse") is not None:
        lines.append(sparse_line(extras["sparse"]))
    lines += startup_lines(extras.get("startup") or [], args.batch_patches)
    print("\n".join(lines), flush=True)


# --- entry point --------------------------------------------------------------------------------


def parse_sizes(text: str) -> list[int]:
    """'1k,10k,50000' -> [1000, 10000, 50000]."""
    sizes = []
    for item in text.split(","):
        item = item.strip().lower()
        scale = 1000 if item.endswith("k") else 1
        sizes.append(int(float(item.rstrip("k")) * scale))
    if any(n < 2 for n in sizes):
        raise argparse.ArgumentTypeError("sizes must be at least 2")
    return sorted(set(sizes))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes",
        type=parse_sizes,
        default=None,
        help=f"bag sizes N (default {DEFAULT_SIZES}; --quick: {QUICK_SIZES})",
    )
    parser.add_argument(
        "--configs",
        default=None,
        help="comma-separated subset of " + ",".join(ALL_CONFIGS) + " (default: all)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="runs per measurement, the median is reported (default 3; --quick: 1)",
    )
    parser.add_argument(
        "--torchmil-exact-max-n",
        type=int,
        default=10_000,
        help="largest N for torchmil's dense exact solve (default 10000)",
    )
    parser.add_argument(
        "--batch-bags",
        type=int,
        default=None,
        help="bags in the batch test (default 500; --quick: 20; 0 skips it)",
    )
    parser.add_argument(
        "--batch-patches", type=int, default=2000, help="patches per batch bag (default 2000)"
    )
    parser.add_argument("--no-whole-process", action="store_true", help="skip the whole-process comparison")
    parser.add_argument(
        "--loop-bags",
        type=int,
        default=None,
        help="single-bag invocations in the loop-vs-directory test "
        "(default 200; --quick: 10; 0 skips it; at most --batch-bags)",
    )
    parser.add_argument("--no-startup", action="store_true", help="skip the start-up rows")
    parser.add_argument(
        "--device", default="cpu", help="cpu (default) or cuda[:N]: smcli only, torchmil skipped"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads in the measuring children, OMP_NUM_THREADS for the CLI runs "
        "(default: torch's default)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--_task", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sizes is None:
        args.sizes = parse_sizes(QUICK_SIZES if args.quick else DEFAULT_SIZES)
    if args.configs is None:
        args.configs = ",".join(QUICK_CONFIGS if args.quick else ALL_CONFIGS)
    args.configs = [config.strip() for config in args.configs.split(",")]
    unknown = [c for c in args.configs if c not in ALL_CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {', '.join(ALL_CONFIGS)}")
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.batch_bags is None:
        args.batch_bags = 20 if args.quick else 500
    if args.loop_bags is None:
        args.loop_bags = 10 if args.quick else 200
    args.loop_bags = min(args.loop_bags, args.batch_bags)
    return args


def bag_path(workdir: Path, n: int) -> Path:
    return workdir / f"bag-{n}.safetensors"


def batch_dir(workdir: Path) -> Path:
    return workdir / "batch"


def bag_specs(args, workdir: Path) -> list[dict]:
    """The bag files to write: one per size (float32), then the batch directory (float16)."""
    bags = [{"path": str(bag_path(workdir, n)), "n": n, "seed": args.seed} for n in args.sizes]
    if args.batch_bags > 0:
        batch_dir(workdir).mkdir()
        bags += [
            {
                "path": str(batch_dir(workdir) / f"slide-{i:05d}.safetensors"),
                "n": args.batch_patches,
                "seed": args.seed + 17 + i,
                "dtype": "float16",
            }
            for i in range(args.batch_bags)
        ]
    return bags


def run_benchmark(args) -> None:
    load_before = os.getloadavg()[0]
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # children and CLI runs inherit it
    workdir = Path(tempfile.mkdtemp(prefix="smcli-bench-"))
    started = time.perf_counter()
    try:
        log(f"writing models and bags to {workdir}")
        prepared = run_task(
            {
                "task": "prepare",
                "device": args.device,
                "threads": args.threads,
                "dir": str(workdir),
                "configs": sorted(set(args.configs) | {WHOLE_PROCESS_CONFIG, EXACT_WHOLE_PROCESS_CONFIG}),
                "seed": args.seed,
                "bags": bag_specs(args, workdir),
            }
        )
        info, models = prepared["info"], prepared["models"]
        log(machine_line(info))
        rows: list[Row] = []
        for n in args.sizes:
            rows += measure_size(n, bag_path(workdir, n), models, args, workdir)
            if n != args.sizes[-1]:
                bag_path(workdir, n).unlink()
        whole = None
        if not args.no_whole_process:
            largest = args.sizes[-1]
            whole = measure_whole_process(largest, bag_path(workdir, largest), models, args, workdir)
        extras: dict = {}
        if args.batch_bags > 0 and not args.no_startup:
            first_bag = sorted(batch_dir(workdir).glob("*.safetensors"))[0]
            extras["startup"] = measure_startup(first_bag, models, args, workdir)
        if args.loop_bags > 0:
            extras["loop"] = measure_loop(models, args, workdir)
        if args.device == "cpu":
            extras["sparse"] = run_task(
                {"task": "sparse", "n": args.sizes[-1], "seed": args.seed, "repeats": args.repeats}
            )
        batch = measure_batch(models, args, workdir) if args.batch_bags > 0 else None
        print_report(args, info, load_before, rows, whole, batch, extras)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    log(f"done in {time.perf_counter() - started:.0f} s")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args._task:
        spec = json.loads(args._task)
        print(json.dumps(TASKS[spec["task"]](spec)))
        return
    run_benchmark(args)


if __name__ == "__main__":
    main()
