"""SmTransformerABMIL at slide scale: smcli (numpy, blocked attention) against torchmil 1.0.2 on the CPU.

Usage (from the repository root, with the project's virtualenv):

    python benchmarks/transformer_bench.py                  # N = 2k, 10k, 50k (a few minutes per side at 50k)
    python benchmarks/transformer_bench.py --sizes 2k,10k --threads 2
    python benchmarks/transformer_bench.py --in-dim 512 --att-dim 256 --layers 2
    python benchmarks/transformer_bench.py --device cuda --sizes 10k,100k   # both sides on the GPU

The report (markdown) goes to stdout, progress to stderr. What is measured, per bag size N:

* The model: torchmil's SmTransformerABMIL defaults (transf_att_dim 512, 4 heads, 1 layer, MLP,
  add_self, approx Sm with trainable alpha; pool att_dim 128, tanh, approx Sm early), in_dim 1024,
  the same weights on both sides (an smcli checkpoint, loaded by torchmil with strict=True).
* Each side runs in a fresh child process (this script with a hidden flag) that reads the bag
  file (features (N, in_dim) float32, tissue-like coords from benchmarks/bench.py), builds the
  graph, then times one forward pass (the graph build is not timed):
    - smcli: `load_model` + `module.attention(features, adjacency)`, numpy + scipy.sparse, the
      self-attention in blocks of query rows (never an N x N matrix); the child never imports torch.
    - torchmil: `SmTransformerABMIL.forward(X[None], adj[None], return_att=True)` under
      `torch.no_grad()`, adj from torchmil's `build_adj` + `normalize_adj` (sparse), torch threads
      set to --threads.
* Peak RSS: the child's high-water mark at the end (`VmHWM`, `getrusage` where /proc is missing),
  which includes the interpreter, the imports and the loaded bag; in brackets, what the forward
  added over the mark taken just before it.
* Max |delta attention_logit| and |delta bag logit| between the two children.

Run it on an otherwise idle machine: the report prints the load average before the run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench import peak_rss_mib, tissue_cells  # noqa: E402  (benchmarks/bench.py, next to this file)

PATCH_SIZE = 512
DIST_THR = math.sqrt(2.0)


def write_bag(path: Path, n: int, in_dim: int, seed: int) -> None:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed + 1_000_003)
    coords = tissue_cells(n, seed) * PATCH_SIZE + rng.integers(0, 40_000, size=2)
    features = rng.standard_normal((n, in_dim), dtype=np.float32)
    save_file({"features": features, "coords": coords}, str(path), metadata={"patch_size": str(PATCH_SIZE)})


def write_model(path: Path, args) -> None:
    """An smcli checkpoint of torchmil's SmTransformerABMIL defaults, weights drawn by numpy."""
    from smcli.checkpoint import ModelConfig, PoolConfig, build_module, save_checkpoint
    from smcli.transformer import TransformerConfig

    pool = PoolConfig(args.in_dim, 128, "tanh", "approx", "trainable", 10, "early", False)
    transformer = TransformerConfig(args.in_dim, args.att_dim, args.layers, args.heads)
    config = ModelConfig(pool, head=True, transformer=transformer)
    save_checkpoint(build_module(config, seed=args.seed).state_dict(), config, path)


# --- the measuring children ------------------------------------------------------------------


def child_smcli(spec: dict) -> dict:
    from smcli.bags import load_bag
    from smcli.checkpoint import load_model
    from smcli.graph import build_adjacency, grid_cells

    model = load_model(spec["model"], spec["device"])
    bag = load_bag(spec["bag"])
    adjacency = build_adjacency(grid_cells(bag.coords, PATCH_SIZE), DIST_THR)
    features = np.ascontiguousarray(bag.features, dtype=np.float32)
    before = peak_rss_mib()
    start = time.perf_counter()
    out = model.module.attention(features, adjacency, symmetric=True)
    bag_logit = float(out.bag_logit)  # a host float: on CUDA this waits for the device
    seconds = time.perf_counter() - start
    logits = model.module.backend.to_numpy(out.attention_logit)
    np.save(spec["logits"], np.asarray(logits, dtype=np.float32))
    return {
        "seconds": seconds,
        "rss_before": before,
        "rss_peak": peak_rss_mib(),
        "bag_logit": bag_logit,
        "torch_imported": "torch" in sys.modules,
        **gpu_peak(spec["device"]),
    }


def gpu_peak(device: str) -> dict:
    """The CUDA allocator's peak in MiB (an empty dict off the GPU)."""
    if not device.startswith("cuda"):
        return {}
    import torch

    return {"gpu_peak": torch.cuda.max_memory_allocated() / 2**20}


def child_torchmil(spec: dict) -> dict:
    import torch
    from safetensors.numpy import load_file
    from safetensors.torch import load_file as load_torch
    from torchmil.models import SmTransformerABMIL
    from torchmil.utils import build_adj, normalize_adj

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"].removeprefix("torch:"))
    config = spec["config"]
    transformer, pool = config["transformer"], config["pool"]
    model = SmTransformerABMIL(
        (pool["in_dim"],),
        pool_att_dim=pool["att_dim"],
        pool_act=pool["act"],
        pool_sm_mode=pool["sm_mode"],
        pool_sm_alpha=pool["sm_alpha"],
        pool_sm_steps=pool["sm_steps"],
        pool_sm_where=pool["sm_where"],
        transf_att_dim=transformer["att_dim"],
        transf_n_layers=transformer["n_layers"],
        transf_n_heads=transformer["n_heads"],
        transf_use_mlp=transformer["use_mlp"],
        transf_add_self=transformer["add_self"],
        transf_sm_alpha=transformer["sm_alpha"],
        transf_sm_mode=transformer["sm_mode"],
        transf_sm_steps=transformer["sm_steps"],
    ).eval()
    state = load_torch(spec["model"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("criterion.") for k in missing), (missing, unexpected)
    bag = load_file(spec["bag"])
    cells = bag["coords"] / PATCH_SIZE
    cells = (cells - cells.min(axis=0)).astype(int)
    n = len(cells)
    edge_index, edge_weight = build_adj(cells, None, dist_thr=DIST_THR)
    weight = normalize_adj(edge_index, edge_weight, n_nodes=n)
    adj = torch.sparse_coo_tensor(edge_index, weight, (n, n)).coalesce().to(torch.float32).to(device)
    features = torch.from_numpy(bag["features"]).to(device)
    model = model.to(device)
    before = peak_rss_mib()
    start = time.perf_counter()
    with torch.no_grad():
        logit, attention = model(features[None], adj[None], return_att=True)
    bag_logit = float(logit[0])  # waits for the device
    seconds = time.perf_counter() - start
    np.save(spec["logits"], attention[0].cpu().numpy())
    return {
        "seconds": seconds,
        "rss_before": before,
        "rss_peak": peak_rss_mib(),
        "bag_logit": bag_logit,
        **gpu_peak(spec["device"]),
    }


def run_child(spec: dict, timeout: float) -> dict | None:
    command = [sys.executable, str(Path(__file__).resolve()), "--_child", json.dumps(spec)]
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout:.0f} s"}
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        return {"error": last[:120]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the parent -------------------------------------------------------------------------------


def parse_sizes(text: str) -> list[int]:
    sizes = []
    for part in text.split(","):
        part = part.strip().lower()
        sizes.append(int(float(part[:-1]) * 1000) if part.endswith("k") else int(part))
    return sizes


def cell(result: dict | None) -> tuple[str, str]:
    if result is None:
        return "not run", ""
    if "error" in result:
        return f"failed ({result['error']})", ""
    rss = f"{result['rss_peak']:,.0f} MiB (+{result['rss_peak'] - result['rss_before']:,.0f})"
    if "gpu_peak" in result:
        rss += f", GPU {result['gpu_peak']:,.0f} MiB"
    return f"{result['seconds']:.2f} s", rss


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2k,10k,50k")
    parser.add_argument("--in-dim", type=int, default=1024)
    parser.add_argument("--att-dim", type=int, default=512)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per child")
    parser.add_argument("--skip-torchmil", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu (numpy, no torch), cuda, or torch:cpu")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        spec = json.loads(args._child)
        result = child_smcli(spec) if spec["side"] == "smcli" else child_torchmil(spec)
        print(json.dumps(result))
        return

    load = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="smcli-transformer-bench-") as tmp:
        workdir = Path(tmp)
        model = workdir / "model.safetensors"
        write_model(model, args)
        from smcli.checkpoint import CONFIG_KEY
        from smcli.tensorfile import read_metadata

        config = json.loads(read_metadata(model)[CONFIG_KEY])
        for n in parse_sizes(args.sizes):
            bag = workdir / f"bag_{n}.safetensors"
            write_bag(bag, n, args.in_dim, args.seed)
            results = {}
            for side in ("smcli", "torchmil"):
                if side == "torchmil" and args.skip_torchmil:
                    results[side] = None
                    continue
                print(f"[transformer-bench] N={n:,} {side} ...", file=sys.stderr, flush=True)
                spec = {
                    "side": side,
                    "model": str(model),
                    "bag": str(bag),
                    "logits": str(workdir / f"{side}.npy"),
                    "threads": args.threads,
                    "config": config,
                    "device": args.device,
                }
                results[side] = run_child(spec, args.timeout)
            delta = ""
            ours, theirs = results["smcli"], results["torchmil"]
            if ours and theirs and "error" not in ours and "error" not in theirs:
                logits = np.abs(
                    np.load(workdir / "smcli.npy").astype(np.float64) - np.load(workdir / "torchmil.npy")
                )
                delta = f"{logits.max():.1e} / {abs(ours['bag_logit'] - theirs['bag_logit']):.1e}"
            rows.append((n, results, delta))
            bag.unlink()

    transformer = config["transformer"]
    print(
        f"SmTransformerABMIL, in_dim {args.in_dim}, {transformer['n_layers']} layer(s) x "
        f"{transformer['n_heads']} heads, att_dim {transformer['att_dim']}, MLP, add_self, approx Sm; "
        f"pool att_dim 128 tanh approx early. Device {args.device}, {args.threads} threads per side, "
        "load average before "
        f"the run {load:.2f}, {os.cpu_count()} CPUs.\n"
    )
    print(
        "| N | smcli forward | smcli peak RSS (forward) | torchmil forward | torchmil peak RSS (forward) "
        "| max abs delta logits / bag logit |"
    )
    print("|---|---|---|---|---|---|")
    for n, results, delta in rows:
        ours_time, ours_rss = cell(results["smcli"])
        theirs_time, theirs_rss = cell(results["torchmil"])
        print(f"| {n:,} | {ours_time} | {ours_rss} | {theirs_time} | {theirs_rss} | {delta} |")
    torch_seen = [results["smcli"].get("torch_imported") for _, results, _ in rows if results["smcli"]]
    print(f"\nsmcli children imported torch: {any(torch_seen)}")


if __name__ == "__main__":
    main()
