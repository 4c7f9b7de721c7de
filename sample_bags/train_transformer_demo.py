"""Train the demo SmTransformerABMIL in sample_bags/models/ and check how well it localizes.

    python sample_bags/train_transformer_demo.py [--seed 0] [--epochs 6] [--lr 1e-3]
                                                 [--weight-decay 0.05] [--out sample_bags/models]

Same data and recipe as sample_bags/train_demo.py (generate.training_set(): 1,000 separate
synthetic slides; AdamW, one bag per step, cosine learning-rate decay to 0, weight decay on weight
matrices only, BCEWithLogitsLoss on the slide label, same seed), but the model is torchmil's own
`SmTransformerABMIL` module trained directly (torchmil's forward with autograd, a plain optimizer
loop rather than torchmil's Trainer, so that the recipe is the other demos' one):

    sm_transformer_abmil.safetensors   1 layer x 4 heads, transf_att_dim 64, MLP, add_self, approx
                                       Sm (trainable alpha, 10 steps); pool att_dim 64, tanh, Sm
                                       approx early, trainable alpha

It is written with `smcli.export_torchmil` (every setting read off the live module), then loaded
with smcli.checkpoint.load_model, checked against torchmil's eval forward on a training bag, and
scored on the sample slides like the other two (instance AUROC of attention_logit per positive
slide). CPU only, one thread, deterministic algorithms where torch has them.
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

import generate  # noqa: E402
import train_demo  # noqa: E402  (the data, the recipe's constants and the evaluation)

import smcli  # noqa: E402
from smcli.checkpoint import load_model, save_checkpoint, with_training  # noqa: E402
from smcli.tensorfile import read_safetensors  # noqa: E402

NAME = "sm_transformer_abmil"
ATT_DIM = 64
N_HEADS = 4


def build_model(seed: int):
    from torchmil.models import SmTransformerABMIL

    torch.manual_seed(seed)
    return SmTransformerABMIL(
        (generate.FEATURE_DIM,),
        pool_att_dim=ATT_DIM,
        pool_act="tanh",
        pool_sm_mode="approx",
        pool_sm_where="early",
        transf_att_dim=ATT_DIM,
        transf_n_layers=1,
        transf_n_heads=N_HEADS,
        transf_use_mlp=True,
        transf_add_self=True,
        transf_dropout=0.0,
        transf_sm_mode="approx",
    )


def torchmil_bag(bag) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(X (1, N, D), adj (1, N, N) sparse COO, label ()) in the layout torchmil's forward takes."""
    features, adjacency, label = bag
    return features[None], adjacency.to_sparse_coo()[None].coalesce(), label


def train(bags: list, seed: int, epochs: int, lr: float, weight_decay: float):
    model = build_model(seed)
    model.train()
    decayed = [p for name, p in model.named_parameters() if name.endswith("weight")]
    others = [p for name, p in model.named_parameters() if not name.endswith("weight")]
    optimizer = torch.optim.AdamW(
        [{"params": decayed, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}], lr=lr
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
            loss = loss_fn(model(X, adj)[0], label)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
        print(f"  epoch {epoch + 1}/{epochs}  mean loss {total / len(bags):.4f}", flush=True)
    model.eval()
    with torch.no_grad():
        losses, correct = [], 0
        for X, adj, label in bags:
            logit = model(X, adj)[0]
            losses.append(loss_fn(logit, label).item())
            correct += int((logit > 0) == (label > 0.5))
    return model, {
        "final_train_loss": round(float(np.mean(losses)), 6),
        "final_train_accuracy": round(correct / len(bags), 6),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=train_demo.SEED)
    parser.add_argument("--epochs", type=int, default=train_demo.EPOCHS)
    parser.add_argument("--lr", type=float, default=train_demo.LR)
    parser.add_argument("--weight-decay", type=float, default=train_demo.WEIGHT_DECAY)
    parser.add_argument("--out", type=Path, default=HERE / "models")
    parser.add_argument("--samples", type=Path, default=HERE, help="sample bags to evaluate on")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    started = time.perf_counter()
    slides = generate.training_set()
    bags = [torchmil_bag(train_demo.bag_tensors(slide)) for slide in slides]
    n_patches = sum(int(slide.features.shape[0]) for slide in slides)
    print(f"training set: {len(bags)} slides, {n_patches} patches ({time.perf_counter() - started:.1f}s)")
    model, summary = train(bags, args.seed, args.epochs, args.lr, args.weight_decay)

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{NAME}.safetensors"
    config = smcli.export_torchmil(model, path, patch_size=float(generate.PATCH_SIZE))
    recipe = {
        "script": "sample_bags/train_transformer_demo.py",
        "seed": args.seed,
        "epochs": args.epochs,
        "lr": args.lr,
        "lr_schedule": "cosine to 0, per step",
        "weight_decay": args.weight_decay,
        "optimizer": "AdamW, one bag per step, decay on weight matrices only",
        "loss": "BCEWithLogitsLoss on the slide label",
        "model": "torchmil 1.0.2 SmTransformerABMIL, trained directly (autograd), exported by smcli",
        "n_train_slides": len(bags),
        "n_train_patches": n_patches,
        "generator_seed": generate.TRAINING_SEED,
        "world_seed": generate.WORLD_SEED,
        "lesion_snr": generate.LESION_SNR,
        "torch": torch.__version__.split("+")[0],
        **summary,
    }
    save_checkpoint(dict(read_safetensors(path).tensors), with_training(config, recipe), path)

    # the written checkpoint must score as torchmil's eval forward does
    loaded = load_model(path)
    X, adj, _ = bags[0]
    with torch.no_grad():
        logit, attention = model(X, adj, return_att=True)
    ours = loaded.module.attention(X[0].numpy(), adj[0], symmetric=True)
    if np.abs(np.asarray(ours.attention_logit) - attention[0].numpy()).max() > 1e-5:
        raise RuntimeError("the exported checkpoint's attention logits differ from torchmil's")
    print(
        f"wrote {path}: train loss {summary['final_train_loss']:.4f}, accuracy "
        f"{summary['final_train_accuracy']:.3f} ({time.perf_counter() - started:.1f}s)"
    )
    models = {name: HERE / "models" / f"{name}.safetensors" for name in train_demo.MODELS}  # committed
    train_demo.evaluate({NAME: path, **models}, args.samples)


if __name__ == "__main__":
    main()
