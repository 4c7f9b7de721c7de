"""Before/after in one run: this tree's smcli against an earlier commit's, on the same 100k bag.

Usage (from the repository root, with the project's virtualenv; torch is not needed):

    python benchmarks/floor.py --before 949dce6            # ~3 min on 2 idle cores
    python benchmarks/floor.py --before main --repeats 7 --n 50000

The earlier commit is exported with `git archive` into a temporary directory; every measurement
runs in a fresh child process with PYTHONPATH pointing at one tree or the other, the two trees
interleaved run by run, so both see the same machine load (printed before and after). Rows:

* whole process: `python -m smcli score BAG -m MODEL -o out.csv --device cpu` for approx-early
  and exact-early (D = 1024, att_dim 128, gelu, trainable alpha at coef 1, 10 steps), median wall
  seconds and peak RSS (wait4);
* in-process: graph + `module.attention` on the loaded bag (float32), median of --repeats after
  one untimed run, and its stages (the projection with its staging copy, the smoothing, the rest);
* parity: max |delta attention_logit| between the two trees' CSVs (same machine: the change in
  numbers, which must stay far inside the 1e-5 promised against torchmil).

The report (markdown) goes to stdout.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
IN_DIM, ATT_DIM, PATCH_SIZE = 1024, 128, 512
CONFIGS = ("approx-early", "exact-early")


def tissue_coords(n: int, seed: int) -> np.ndarray:
    """(n, 2) int64 level-0 coords: bench.py's tissue-like region (lobes, holes, ragged border)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench import tissue_cells

    origin = np.random.default_rng(seed + 7).integers(0, 40_000, size=2)
    return tissue_cells(n, seed) * PATCH_SIZE + origin


def write_inputs(workdir: Path, n: int, seed: int) -> tuple[Path, dict[str, Path]]:
    from safetensors.numpy import save_file

    from smcli.checkpoint import ModelConfig, PoolConfig, build_module, save_checkpoint

    bag = workdir / "bag.safetensors"
    features = np.random.default_rng(seed).standard_normal((n, IN_DIM), dtype=np.float32)
    save_file(
        {"features": features, "coords": tissue_coords(n, seed)}, str(bag), {"patch_size": str(PATCH_SIZE)}
    )
    models = {}
    for config in CONFIGS:
        mode, where = config.split("-")
        pool = PoolConfig(IN_DIM, ATT_DIM, act="gelu", sm_mode=mode, sm_where=where)
        models[config] = workdir / f"model-{config}.safetensors"
        save_checkpoint(
            build_module(ModelConfig(pool), seed=seed).state_dict(), ModelConfig(pool), models[config]
        )
    return bag, models


IN_PROCESS = r"""
import json, sys, time
import numpy as np
from safetensors.numpy import load_file
from smcli.checkpoint import load_model
from smcli.graph import build_adjacency, grid_cells
from smcli.model import SmGraph

bag, model_path, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
tensors = load_file(bag)
features, coords = tensors["features"], tensors["coords"]
module = load_model(model_path).module
times, cpu = [], []
for run in range(repeats + 1):
    started, started_cpu = time.perf_counter(), time.process_time()
    adjacency = build_adjacency(grid_cells(coords, 512))
    graph = SmGraph(adjacency.to_scipy(), module.backend, symmetric=True)
    module.attention(features, graph)
    if run:
        times.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
print(json.dumps([times, cpu]))
"""


def child_env(tree: Path) -> dict[str, str]:
    """The environment of a child that imports smcli from `tree` (its cwd must not hold an smcli)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree)
    return env


def whole_process(tree: Path, bag: Path, model: Path, out: Path) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds (user + system) and peak RSS MiB of one `smcli score` process."""
    out.unlink(missing_ok=True)
    command = [sys.executable, "-m", "smcli", "score", str(bag), "-m", str(model), "-o", str(out)]
    started = time.perf_counter()
    process = subprocess.Popen(
        [*command, "--device", "cpu", "--overwrite"], env=child_env(tree), cwd=out.parent
    )
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{tree}: smcli score failed")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024.0


def in_process(tree: Path, bag: Path, model: Path, repeats: int) -> list[list[float]]:
    command = [sys.executable, "-c", IN_PROCESS, str(bag), str(model), str(repeats)]
    result = subprocess.run(
        command, env=child_env(tree), cwd=bag.parent, capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout)


def logits(path: Path) -> np.ndarray:
    with open(path, newline="") as handle:
        return np.array([float(row["attention_logit"]) for row in csv.DictReader(handle)])


def load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="git revision to compare against")
    parser.add_argument("--n", type=int, default=100_000, help="patches in the bag (default 100000)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per row (median; default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="approx-early and/or exact-early")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="smcli-floor-") as temporary:
        workdir = Path(temporary)
        before = workdir / "before"
        before.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", args.before, "smcli"], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(before)], input=archive.stdout, check=True)
        trees = {"before": before, "after": ROOT}
        bag, models = write_inputs(workdir, args.n, args.seed)
        start_load = load()
        walls: dict[tuple[str, str], list[float]] = {}
        cpus: dict[tuple[str, str], list[float]] = {}
        rss: dict[tuple[str, str], list[float]] = {}
        inproc: dict[tuple[str, str], list[list[float]]] = {}
        configs = args.configs.split(",")
        for config in configs:
            for side, tree in trees.items():  # warm the page cache and the bytecode
                whole_process(tree, bag, models[config], workdir / f"{side}-{config}.csv")
            for _ in range(args.repeats):
                for side, tree in trees.items():
                    wall, cpu, peak = whole_process(
                        tree, bag, models[config], workdir / f"{side}-{config}.csv"
                    )
                    walls.setdefault((side, config), []).append(wall)
                    cpus.setdefault((side, config), []).append(cpu)
                    rss.setdefault((side, config), []).append(peak)
            for side, tree in trees.items():
                inproc[(side, config)] = in_process(tree, bag, models[config], args.repeats)
        end_load = load()
        revision = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", args.before], capture_output=True, text=True
        ).stdout.strip()
        print(
            f"N = {args.n:,}, median of {args.repeats}; before = {revision}, after = this tree; "
            f"load average {start_load} at the start, {end_load} at the end\n"
        )
        print(
            "| row | before s (CPU s) | after s (CPU s) | after / before | peak RSS MiB | max \\|Δ logit\\| |"
        )
        print("|---|---:|---:|---:|---|---:|")

        def cell(times: list[float], cpu: list[float]) -> str:
            return f"{statistics.median(times):.3f} ({statistics.median(cpu):.3f})"

        for config in configs:
            before_logits, after_logits = (logits(workdir / f"{side}-{config}.csv") for side in trees)
            delta = np.abs(before_logits - after_logits).max()
            b, a = (statistics.median(walls[(side, config)]) for side in trees)
            rb, ra = (statistics.median(rss[(side, config)]) for side in trees)
            before_cell, after_cell = (cell(walls[(side, config)], cpus[(side, config)]) for side in trees)
            print(
                f"| `smcli score` {config}, whole process | {before_cell} | {after_cell} | {a / b:.2f} | "
                f"{rb:.0f} → {ra:.0f} | {delta:.1e} |"
            )
            b, a = (statistics.median(inproc[(side, config)][0]) for side in trees)
            before_cell, after_cell = (cell(*inproc[(side, config)]) for side in trees)
            print(f"| in-process graph + model, {config} | {before_cell} | {after_cell} | {a / b:.2f} | | |")


if __name__ == "__main__":
    main()
