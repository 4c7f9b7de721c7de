"""Train the two demo checkpoints in sample_bags/models/ and check how well they localize.

    python sample_bags/train_demo.py [--seed 0] [--epochs 6] [--lr 1e-3] [--weight-decay 0.05]
                                     [--out sample_bags/models] [--samples sample_bags]

Trains, on generate.training_set() (a separate synthetic set: own seed, same embedding world as
the sample slides), two torchmil-layout SmABMIL models that differ only in Sm:

    sm_abmil.safetensors   att_dim 64, tanh, Sm approx, trainable alpha, 10 steps, early
    abmil.safetensors      the same with sm_where "none": plain ABMIL, the baseline

Both start from the same initial weights and see the bags in the same order. Then it loads each
checkpoint with smcli.checkpoint.load_model, scores the sample slides with smcli.scoring.score_bag
and prints the instance-level AUROC of attention_logit against the patch labels per positive
slide.

CPU only, one thread, deterministic algorithms: running it twice on one machine writes
byte-identical checkpoints (another CPU may round float32 differently in the last bits), in
about half a minute on one core. Neither torchmil nor smcli's no-grad production path is used
for training: `forward` below is torchmil's SmABMIL forward written with
autograd-friendly torch ops (smcli's model is numpy on the CPU, without gradients). The torch
modules here carry torchmil's parameter names, so the state dict has torchmil's layout; after
training the forward is checked against smcli's production path and forward_reference.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import generate  # noqa: E402  (sample_bags/generate.py, next to this file)

from smcli.bags import load_bag  # noqa: E402
from smcli.checkpoint import (  # noqa: E402
    ModelConfig,
    PoolConfig,
    load_model,
    save_checkpoint,
    with_training,
)
from smcli.graph import build_adjacency, grid_cells  # noqa: E402
from smcli.metrics import auroc  # noqa: E402
from smcli.scoring import score_bag  # noqa: E402

SEED = 0
EPOCHS = 6
LR = 1e-3
WEIGHT_DECAY = 0.05
ATT_DIM = 64
MODELS = {"sm_abmil": "early", "abmil": "none"}  # checkpoint name -> sm_where


def model_config(sm_where: str, in_dim: int = generate.FEATURE_DIM) -> ModelConfig:
    pool = PoolConfig(
        in_dim=in_dim,
        att_dim=ATT_DIM,
        act="tanh",
        sm_mode="approx",
        sm_alpha="trainable",
        sm_steps=10,
        sm_where=sm_where,
        spectral_norm=False,
    )
    return ModelConfig(pool, head=True, patch_size=float(generate.PATCH_SIZE))


ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu, "gelu": torch.nn.functional.gelu}


class _Coefficient(torch.nn.Module):
    """Holds Sm's trainable coef, so that its state-dict name is torchmil's `sm.sm.coef`."""

    def __init__(self) -> None:
        super().__init__()
        self.sm = torch.nn.Module()
        self.sm.coef = torch.nn.Parameter(torch.tensor(1.0))  # torchmil's initial value


class TrainablePool(torch.nn.Module):
    """SmAttentionPool's parameters under torchmil's names, as trainable torch modules."""

    def __init__(self, config: PoolConfig) -> None:
        super().__init__()
        self.sm_where = config.sm_where
        self.num_steps = config.sm_steps
        self.act_fn = ACTIVATIONS[config.act]
        self.sm = _Coefficient() if config.sm_where != "none" else None
        self.proj1 = torch.nn.Linear(config.in_dim, config.att_dim)
        self.proj2 = torch.nn.Linear(config.att_dim, 1, bias=False)


class TrainableSmABMIL(torch.nn.Module):
    """SmABMIL without a feature extractor: `pool` and the linear head `last_layer`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.pool = TrainablePool(config.pool)
        self.last_layer = torch.nn.Linear(config.pool.in_dim, 1)


def build_module(config: ModelConfig) -> TrainableSmABMIL:
    """The trainable model for a config (approx Sm, early or none, with a head), from torch's RNG."""
    return TrainableSmABMIL(config)


def bag_tensors(slide: generate.Slide) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """features (N, D) float32, the normalized CSR adjacency (N, N), the slide label ()."""
    adjacency = build_adjacency(grid_cells(slide.coords, generate.PATCH_SIZE))
    features = torch.from_numpy(slide.features.astype(np.float32))
    label = torch.tensor(1.0 if slide.positive else 0.0)
    return features, adjacency.to_torch(torch.float32), label


class _SymmetricSpMM(torch.autograd.Function):
    """adj @ g for a symmetric sparse adj; the backward is adj @ grad (no transpose of the CSR).

    smcli.graph's normalized adjacency is symmetric (w_ij = d_i^-1/2 d_j^-1/2 on a symmetric
    edge set). torch.sparse.mm would give the same numbers at twice the cost.
    """

    @staticmethod
    def forward(ctx, adj: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        ctx.adj = adj
        return torch.sparse.mm(adj, g)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, torch.sparse.mm(ctx.adj, grad)


def smooth(f: torch.Tensor, adj: torch.Tensor, coef: torch.Tensor, num_steps: int) -> torch.Tensor:
    """torchmil's ApproxSm with a tensor coef: g <- (1 - a) f + a A g, a = 1 / (1 + coef)."""
    a = 1.0 / (1.0 + coef)
    g = f
    for _ in range(num_steps):
        g = (1.0 - a) * f + a * _SymmetricSpMM.apply(adj, g)
    return g


def forward(model, X: torch.Tensor, adj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torchmil SmABMIL.forward(X, adj, return_att=True) for one bag: bag logit (), f (N,).

    torchmil computes X <- Sm(X) (early), f = proj2(act(proj1(X))), s = softmax(f),
    logit = last_layer(X^T s). Sm is linear and acts on the instance axis, so it is applied after
    projecting onto proj1's and the head's weights (att_dim + 1 columns instead of in_dim):
    Sm(X) W^T = Sm(X W^T) and w . (Sm(X)^T s) = s . Sm(X w). Same function, 3x less work.
    """
    pool, head = model.pool, model.last_layer
    att_dim = pool.proj1.weight.shape[0]
    projected = X @ torch.cat([pool.proj1.weight, head.weight]).T  # (N, att_dim + 1)
    if pool.sm_where == "early" and pool.sm is not None:
        projected = smooth(projected, adj, pool.sm.sm.coef, pool.num_steps)
    H = pool.act_fn(projected[:, :att_dim] + pool.proj1.bias)  # (N, att_dim)
    f = (H @ pool.proj2.weight.T).squeeze(-1)  # (N,)
    s = torch.softmax(f, dim=0)  # (N,)
    return s @ projected[:, att_dim] + head.bias[0], f


def train(
    config: ModelConfig, bags: list, seed: int, epochs: int, lr: float, weight_decay: float
) -> tuple[torch.nn.Module, dict]:
    """AdamW, one bag per step, cosine learning-rate decay to 0; weight decay on weight matrices
    only (not on biases, and not on Sm's coef, so the amount of smoothing is learned freely)."""
    torch.manual_seed(seed)  # same initial weights for both models (Sm's coef starts at 1.0)
    model = build_module(config)
    model.train()
    decayed = [p for name, p in model.named_parameters() if name.endswith("weight")]
    others = [p for name, p in model.named_parameters() if not name.endswith("weight")]
    optimizer = torch.optim.AdamW(
        [{"params": decayed, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}],
        lr=lr,
    )
    loss_fn = torch.nn.BCEWithLogitsLoss()
    order_rng = torch.Generator().manual_seed(seed)
    total_steps, step = epochs * len(bags), 0
    for epoch in range(epochs):
        total = 0.0
        for index in torch.randperm(len(bags), generator=order_rng).tolist():
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
            step += 1
            X, adj, label = bags[index]
            logit, _ = forward(model, X, adj)
            loss = loss_fn(logit, label)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
        coef = ""
        if model.pool.sm is not None:
            coef = f"  coef {model.pool.sm.sm.coef.item():.3f}"
        print(f"  epoch {epoch + 1}/{epochs}  mean loss {total / len(bags):.4f}{coef}", flush=True)
    model.eval()
    with torch.no_grad():
        losses, correct = [], 0
        for X, adj, label in bags:
            logit, _ = forward(model, X, adj)
            losses.append(loss_fn(logit, label).item())
            correct += int((logit > 0) == (label > 0.5))
    summary = {
        "final_train_loss": round(float(np.mean(losses)), 6),
        "final_train_accuracy": round(correct / len(bags), 6),
    }
    return model, summary


def check_against_reference(model, bag) -> None:
    """The training forward must equal smcli's model (production path and forward_reference)."""
    from smcli.checkpoint import build_module as build_smcli_model

    X, adj, _ = bag
    with torch.no_grad():
        logit, f = forward(model, X, adj)
    reference = build_smcli_model(model.config)
    reference.load_state_dict(model.state_dict())
    production = reference.attention(X.numpy(), adj)
    ref_logit, ref_f = reference.forward_reference(X.numpy(), adj)
    for name, (other_logit, other_f) in {
        "forward_reference": (ref_logit, ref_f),
        "attention": (production.bag_logit, production.attention_logit),
    }.items():
        if not np.allclose(f.numpy(), other_f, rtol=1e-4, atol=1e-5):
            raise RuntimeError(f"training forward: attention logits differ from smcli's {name}")
        if not math.isclose(float(logit), other_logit, rel_tol=1e-4, abs_tol=1e-5):
            raise RuntimeError(f"training forward: bag logit differs from smcli's {name}")


def evaluate(checkpoints: dict[str, Path], sample_dir: Path) -> None:
    """Score the sample slides with smcli and print instance AUROC per positive slide."""
    paths = sorted(sample_dir.glob("*.safetensors"))
    if not paths:
        print(f"no sample bags in {sample_dir}: run sample_bags/generate.py first")
        return
    models = {name: load_model(path) for name, path in checkpoints.items()}
    names = list(models)
    print("\ninstance AUROC of attention_logit vs lesion labels (sample slides), and P(positive)")
    print(
        f"{'slide':10s} {'patches':>7s} {'lesion':>6s}  "
        + "  ".join(f"{n + ' AUROC':>14s}" for n in names)
        + "  "
        + "  ".join(f"{'P ' + n:>10s}" for n in names)
    )
    scores: dict[str, list[float]] = {n: [] for n in names}
    for path in paths:
        bag = load_bag(path)
        row = []
        probabilities = []
        for name in names:
            result = score_bag(models[name], bag)
            value = auroc(result.table["attention_logit"].to_numpy(), bag.labels)
            if value is not None:
                scores[name].append(value)
            row.append("-" if value is None else f"{value:.3f}")
            probabilities.append(result.summary.probability)
        print(
            f"{bag.bag_id:10s} {bag.n_instances:7d} {int(bag.labels.sum()):6d}  "
            + "  ".join(f"{r:>14s}" for r in row)
            + "  "
            + "  ".join(f"{p:10.3f}" for p in probabilities)
        )
    print(f"{'mean':10s} {'':7s} {'':6s}  " + "  ".join(f"{np.mean(scores[n]):14.3f}" for n in names))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--weight-decay", type=float, default=WEIGHT_DECAY)
    parser.add_argument("--out", type=Path, default=HERE / "models")
    parser.add_argument("--samples", type=Path, default=HERE, help="sample bags to evaluate on")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # a fixed reduction order: reproducible to the bit
    torch.use_deterministic_algorithms(True)
    started = time.perf_counter()
    slides = generate.training_set()
    bags = [bag_tensors(slide) for slide in slides]
    n_patches = sum(int(slide.features.shape[0]) for slide in slides)
    print(
        f"training set: {len(bags)} slides, {n_patches} patches, "
        f"{sum(s.positive for s in slides)} positive ({time.perf_counter() - started:.1f}s)"
    )

    args.out.mkdir(parents=True, exist_ok=True)
    checkpoints = {}
    for name, sm_where in MODELS.items():
        print(f"{name} (sm_where={sm_where})")
        config = model_config(sm_where)
        model, summary = train(config, bags, args.seed, args.epochs, args.lr, args.weight_decay)
        check_against_reference(model, bags[0])
        recipe = {
            "script": "sample_bags/train_demo.py",
            "seed": args.seed,
            "epochs": args.epochs,
            "lr": args.lr,
            "lr_schedule": "cosine to 0, per step",
            "weight_decay": args.weight_decay,
            "optimizer": "AdamW, one bag per step, decay on weight matrices only",
            "loss": "BCEWithLogitsLoss on the slide label",
            "n_train_slides": len(bags),
            "n_train_patches": n_patches,
            "train_patches_per_slide": list(generate.TRAINING_PATCHES),
            "generator_seed": generate.TRAINING_SEED,
            "world_seed": generate.WORLD_SEED,
            "lesion_snr": generate.LESION_SNR,
            "torch": torch.__version__.split("+")[0],
            **summary,
        }
        if model.pool.sm is not None:
            recipe["final_sm_coef"] = round(model.pool.sm.sm.coef.item(), 6)
        path = args.out / f"{name}.safetensors"
        save_checkpoint(model.state_dict(), with_training(config, recipe), path)
        checkpoints[name] = path
        print(
            f"  wrote {path}: train loss {summary['final_train_loss']:.4f}, "
            f"accuracy {summary['final_train_accuracy']:.3f}"
        )
    print(f"training took {time.perf_counter() - started:.1f}s")
    evaluate(checkpoints, args.samples)


if __name__ == "__main__":
    main()
