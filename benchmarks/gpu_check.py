"""CPU-vs-GPU parity and GPU timings for smcli's scoring path (run by gpu_check.sh).

For every sm_mode x sm_where at N = 100k (D = 1024, att_dim 128, trainable alpha with coef 1.7,
with the SmABMIL head), scores one tissue-like bag on the CPU and on CUDA and prints the max
|delta attention_logit| and the bag-logit difference, then the GPU time of the whole in-process
pipeline (graph build on the CPU included) at N = 100k and N = 1,000,000.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from smcli.checkpoint import ModelConfig, PoolConfig, build_module
from smcli.graph import build_adjacency, grid_cells


def tissue_coords(n: int, seed: int, patch: int = 512) -> np.ndarray:
    """n grid cells from a blobby mask with holes: a union of discs minus smaller discs."""
    rng = np.random.default_rng(seed)
    side = int(math.sqrt(n / 0.55)) + 8
    yy, xx = np.mgrid[0:side, 0:side]
    mask = np.zeros((side, side), dtype=bool)
    for _ in range(12):
        cx, cy, r = rng.uniform(0, side), rng.uniform(0, side), rng.uniform(side / 8, side / 3)
        mask |= (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
    for _ in range(20):
        cx, cy, r = rng.uniform(0, side), rng.uniform(0, side), rng.uniform(1, side / 25)
        mask &= (xx - cx) ** 2 + (yy - cy) ** 2 >= r * r
    cells = np.argwhere(mask)
    if len(cells) < n:  # top up with a plain grid beside the tissue
        extra = np.argwhere(np.ones((side, side), dtype=bool)) + [side + 2, 0]
        cells = np.concatenate([cells, extra])
    return cells[rng.permutation(len(cells))[:n]] * patch


def model_for(mode: str, where: str, device: str, seed: int = 0):
    """The same weights on either backend: "cpu" (numpy + scipy) or "cuda" (torch)."""
    config = ModelConfig(PoolConfig(1024, 128, "gelu", mode, "trainable", 10, where), head=True)
    module = build_module(config, seed=seed)
    state = module.state_dict()
    state["pool.sm.sm.coef"] = np.array(1.7, dtype=np.float32)
    module.load_state_dict(state)
    return module.to(device)


def score(module, features, coords, device: str):
    """The in-process pipeline of `smcli score`: graph on the CPU, model on `device`."""
    adjacency = build_adjacency(grid_cells(coords, 512))
    out = module.attention(features, adjacency, symmetric=True)  # host numpy features, as read
    logits = out.attention_logit
    return (logits.cpu().numpy() if isinstance(logits, torch.Tensor) else logits), out.bag_logit


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device")
    device_name = torch.cuda.get_device_name(0)
    print(f"# {device_name}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    sizes = [int(s) for s in args.sizes.split(",")]

    n = sizes[0]
    coords = tissue_coords(n, seed=1)
    features = np.random.default_rng(2).standard_normal((n, 1024)).astype(np.float32)
    print(f"\n## parity at N = {n:,}: CPU vs CUDA")
    print("| mode | where | max abs d(attention_logit) | abs d(bag logit) | CPU s | GPU s |")
    print("|---|---|---|---|---|---|")
    for mode in ("approx", "exact"):
        for where in ("early", "mid", "late"):
            cpu_model, gpu_model = model_for(mode, where, "cpu"), model_for(mode, where, "cuda")
            start = time.perf_counter()
            cpu_logits, cpu_bag = score(cpu_model, features, coords, "cpu")
            cpu_s = time.perf_counter() - start
            score(gpu_model, features, coords, "cuda")  # warm-up
            gpu_s = timed(lambda m=gpu_model: score(m, features, coords, "cuda"), args.repeats)
            gpu_logits, gpu_bag = score(gpu_model, features, coords, "cuda")
            delta = float(np.abs(cpu_logits - gpu_logits).max())
            bag_delta = abs(cpu_bag - gpu_bag)
            print(f"| {mode} | {where} | {delta:.2e} | {bag_delta:.2e} | {cpu_s:.2f} | {gpu_s:.3f} |")

    print("\n## GPU time of the whole pipeline (graph on CPU + transfer + model), median of repeats")
    print("| N | mode | where | seconds | of which graph build (CPU) |")
    print("|---|---|---|---|---|")
    for n in sizes:
        coords = tissue_coords(n, seed=3)
        features = np.random.default_rng(4).standard_normal((n, 1024)).astype(np.float32)
        start = time.perf_counter()
        build_adjacency(grid_cells(coords, 512))
        graph_s = time.perf_counter() - start
        for mode in ("approx", "exact"):
            model = model_for(mode, "early", "cuda")
            score(model, features, coords, "cuda")
            seconds = timed(lambda m=model, x=features, c=coords: score(m, x, c, "cuda"), args.repeats)
            print(f"| {n:,} | {mode} | early | {seconds:.3f} | {graph_s:.3f} |")


if __name__ == "__main__":
    main()
