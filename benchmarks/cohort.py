"""Big-cohort rate: bags/s over the first and the last 500 bags of one `smcli score DIR -o OUT` run.

A directory output updates `_bags.csv` after every bag; if that cost grew with the number of rows
already there (rewriting the whole file each time), the last bags of a 5,000-bag cohort would be
much slower than the first. The target: the two rates within 20 % of each other.

    python benchmarks/cohort.py [--bags 5000] [--patches 16] [--window 500]

Runs in-process (smcli.batch.run_score with a callback timing each bag), with tiny bags of the
sample model's width, so the per-bag bookkeeping dominates. Prints one Markdown line.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "sample_bags" / "models" / "sm_abmil.safetensors"


def write_bags(folder: Path, n_bags: int, n_patches: int, in_dim: int) -> None:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    side = int(np.ceil(np.sqrt(n_patches)))
    coords = (np.argwhere(np.ones((side, side)))[:n_patches] * 256).astype(np.int64)
    for index in range(n_bags):
        features = rng.standard_normal((n_patches, in_dim)).astype(np.float32)
        save_file(
            {"features": features, "coords": coords},
            str(folder / f"bag-{index:05d}.safetensors"),
            metadata={"patch_size": "256"},
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bags", type=int, default=5000)
    parser.add_argument("--patches", type=int, default=16)
    parser.add_argument("--window", type=int, default=500)
    args = parser.parse_args()

    from smcli.batch import ScoreRequest, run_score
    from smcli.checkpoint import load_model

    in_dim = load_model(MODEL).in_dim
    with tempfile.TemporaryDirectory() as workdir:
        bags, out = Path(workdir) / "bags", Path(workdir) / "out"
        bags.mkdir()
        write_bags(bags, args.bags, args.patches, in_dim)
        stamps: list[float] = []
        started = time.perf_counter()
        summary = run_score(
            ScoreRequest(inputs=[bags], model=MODEL, output=out),
            lambda result: stamps.append(time.perf_counter()),
        )
        wall = time.perf_counter() - started
    window = min(args.window, len(stamps) // 2)
    first = window / (stamps[window] - stamps[0])  # from the first bag done: no start-up in it
    last = window / (stamps[-1] - stamps[-window - 1])
    print(
        f"- cohort: {args.bags} bags × {args.patches} patches into one directory, {summary.ok} ok, "
        f"{wall:.1f} s: first {window} bags {first:.1f} bags/s, last {window} {last:.1f} bags/s "
        f"(last/first {last / first:.2f}; load average before {os.getloadavg()[0]:.1f})"
    )


if __name__ == "__main__":
    main()
