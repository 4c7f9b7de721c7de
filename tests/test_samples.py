"""The sample bags, their generator, the demo trainer's forward, and the committed checkpoints."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
import torch

from smcli.bags import load_bag
from smcli.checkpoint import load_model
from smcli.graph import build_adjacency, grid_cells
from smcli.metrics import auroc
from smcli.scoring import score_bag

SAMPLES = Path(__file__).resolve().parent.parent / "sample_bags"
sys.path.insert(0, str(SAMPLES))

import generate  # noqa: E402  (sample_bags/generate.py)
import train_demo  # noqa: E402  (sample_bags/train_demo.py)

SAMPLE_FILES = sorted(SAMPLES.glob("*.safetensors"))
CHECKPOINTS = {"sm_abmil": "early", "abmil": "none"}


@pytest.fixture(scope="module")
def world():
    return generate.make_world()


def small_slide(world, seed=5, positive=True, n=400):
    return generate.make_slide(seed, 0, n, positive, "t", world)


# ---------------------------------------------------------------------------------------------
# generator


def test_same_seed_same_slide_different_seed_different(world):
    a, b = small_slide(world), small_slide(world)
    for name in ("features", "coords", "labels"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert a.metadata == b.metadata
    c = small_slide(world, seed=6)
    assert not np.array_equal(a.features, c.features)
    assert not np.array_equal(a.coords, c.coords)
    d = generate.make_slide(5, 1, 400, True, "t", world)  # another index of the same seed
    assert not np.array_equal(a.coords, d.coords)


def test_written_files_are_byte_identical_and_readable(world, tmp_path):
    slide = small_slide(world)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = generate.write_slide(slide, tmp_path / "a")
    second = generate.write_slide(small_slide(world), tmp_path / "b")
    assert first.read_bytes() == second.read_bytes()
    header_len = int.from_bytes(first.read_bytes()[:8], "little")
    header = first.read_bytes()[8 : 8 + header_len].decode()
    assert header_len % 8 == 0
    parsed = json.loads(header)
    assert list(parsed) == sorted(parsed) and list(parsed["__metadata__"]) == sorted(parsed["__metadata__"])

    bag = load_bag(first)
    assert bag.bag_id == "t" and bag.patch_size == 512.0
    assert bag.features.dtype == np.float16
    assert np.array_equal(bag.features, slide.features)
    assert np.array_equal(bag.coords, slide.coords)
    assert np.array_equal(bag.labels, slide.labels)
    assert {k: bag.metadata.get(k) for k in slide.metadata} == slide.metadata


def test_a_generated_slide_keeps_its_promises(world):
    slide = small_slide(world, n=600)
    n = 600
    assert slide.features.shape == (n, generate.FEATURE_DIM) and slide.features.dtype == np.float16
    assert np.isfinite(slide.features.astype(np.float32)).all()
    assert slide.coords.shape == (n, 2) and slide.coords.dtype == np.int64
    assert slide.labels.shape == (n,) and slide.labels.dtype == np.uint8
    assert set(np.unique(slide.labels)) == {0, 1}
    assert slide.metadata["slide_label"] == "1"
    assert slide.metadata["n_lesion_patches"] == str(int(slide.labels.sum()))

    cells = grid_cells(slide.coords, generate.PATCH_SIZE)
    assert np.unique(cells, axis=0).shape[0] == n  # one patch per grid cell
    steps = slide.coords - slide.coords.min(axis=0)
    assert (steps % generate.PATCH_SIZE == 0).all()  # on the 512 grid
    degree = np.diff(build_adjacency(cells).crow)
    assert 3 <= int((degree == 0).sum()) <= 8  # the stray isolated patches
    assert degree.mean() > 6  # but mostly solid tissue
    # the lesion is a blob: nearly every lesion patch touches another lesion patch
    adjacency = build_adjacency(cells)
    rows = adjacency.rows()
    lesion = slide.labels.astype(bool)
    lesion_neighbours = np.bincount(rows, weights=lesion[adjacency.col], minlength=n)
    assert (lesion_neighbours[lesion] > 0).mean() > 0.95
    assert 30 <= lesion.sum() <= 400

    negative = small_slide(world, positive=False)
    assert negative.labels.sum() == 0 and negative.metadata["slide_label"] == "0"


def test_lesion_signal_is_weak_per_patch_and_strong_when_pooled(world):
    slide = small_slide(world, seed=11, n=1500)
    along = slide.features.astype(np.float64) @ world.lesion_dir
    per_patch = auroc(along, slide.labels)
    assert 0.7 < per_patch < 0.9  # speckled: many background patches outscore lesion patches
    X, adj, _ = train_demo.bag_tensors(slide)
    pooled = train_demo.smooth(torch.from_numpy(along)[:, None].float(), adj, torch.tensor(0.3), 10)
    assert auroc(pooled[:, 0].numpy(), slide.labels) > per_patch + 0.05


def test_training_set_is_separate_and_half_positive(world):
    train = generate.training_set(n_slides=6, patches=(150, 200), world=world)
    assert sum(s.positive for s in train) == 3
    assert all(150 <= s.features.shape[0] <= 200 for s in train)
    assert len({s.name for s in train}) == 6
    samples = generate.training_set(seed=0, n_slides=6, patches=(150, 200), world=world)
    assert not np.array_equal(train[0].features, samples[0].features)


# ---------------------------------------------------------------------------------------------
# the committed sample bags


def test_sample_set_is_committed():
    assert [p.stem for p in SAMPLE_FILES] == [f"slide_{i:02d}" for i in range(1, generate.SAMPLE_SLIDES + 1)]
    committed = sum(p.stat().st_size for p in SAMPLES.rglob("*.safetensors"))
    assert committed < 20 * 1024 * 1024


@pytest.mark.parametrize("path", SAMPLE_FILES, ids=lambda p: p.stem)
def test_sample_bag(path):
    bag = load_bag(path)
    assert bag.bag_id == path.stem
    assert bag.patch_size == 512.0 and bag.metadata["patch_size"] == "512"
    assert bag.features.dtype == np.float16 and bag.features.shape[1] == generate.FEATURE_DIM
    assert 1000 <= bag.n_instances <= 6000
    assert bag.labels is not None and set(np.unique(bag.labels)) <= {0, 1}
    positive = bool(bag.labels.any())
    assert bag.metadata["slide_label"] == ("1" if positive else "0")
    assert bag.metadata["n_lesion_patches"] == str(int(bag.labels.sum()))


def test_half_the_samples_are_positive():
    labels = [load_bag(p).metadata["slide_label"] for p in SAMPLE_FILES]
    assert labels.count("1") == labels.count("0") == len(SAMPLE_FILES) // 2


def test_committed_samples_are_what_the_generator_makes():
    for slide, path in zip(generate.sample_set(0), SAMPLE_FILES, strict=True):
        bag = load_bag(path)
        assert bag.bag_id == slide.name
        assert np.array_equal(bag.coords, slide.coords)
        assert np.array_equal(bag.labels, slide.labels)
        committed = bag.features.astype(np.float32)
        assert np.allclose(committed, slide.features.astype(np.float32), atol=1e-2)


# ---------------------------------------------------------------------------------------------
# the demo trainer and its checkpoints


def test_training_forward_is_torchmils_and_trains_coef(world):
    torch.manual_seed(0)
    model = train_demo.build_module(train_demo.model_config("early"))
    with torch.no_grad():
        model.pool.sm.sm.coef.fill_(0.4)
    bag = train_demo.bag_tensors(small_slide(world))
    train_demo.check_against_reference(model, bag)  # equals smcli's forward_reference
    logit, f = train_demo.forward(model, bag[0], bag[1])
    logit.backward()
    assert model.pool.sm.sm.coef.grad is not None and model.pool.sm.sm.coef.grad != 0
    assert model.pool.proj1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_demo_checkpoint_loads(name):
    loaded = load_model(SAMPLES / "models" / f"{name}.safetensors")
    config = loaded.config
    assert config.head and config.patch_size == 512.0
    assert config.pool.in_dim == generate.FEATURE_DIM and config.pool.att_dim == 64
    assert config.pool.act == "tanh" and config.pool.sm_where == CHECKPOINTS[name]
    assert config.pool.sm_alpha == "trainable" and config.pool.sm_mode == "approx"
    expected = {
        "pool.proj1.weight",
        "pool.proj1.bias",
        "pool.proj2.weight",
        "last_layer.weight",
        "last_layer.bias",
    }
    if name == "sm_abmil":
        expected.add("pool.sm.sm.coef")
    assert set(loaded.module.state_dict()) == expected
    for key in (
        "seed",
        "epochs",
        "lr",
        "n_train_slides",
        "generator_seed",
        "final_train_loss",
        "final_train_accuracy",
    ):
        assert key in config.training


def test_sm_localizes_better_than_the_baseline_on_the_samples():
    models = {name: load_model(SAMPLES / "models" / f"{name}.safetensors") for name in CHECKPOINTS}
    means = {}
    for name, model in models.items():
        values = []
        for path in SAMPLE_FILES:
            bag = load_bag(path)
            result = score_bag(model, bag)
            value = auroc(result.table["attention_logit"].to_numpy(), bag.labels)
            if value is not None:
                values.append(value)
        assert len(values) == len(SAMPLE_FILES) // 2
        means[name] = float(np.mean(values))
    assert means["sm_abmil"] > means["abmil"] > 0.6


def test_training_is_deterministic(world, tmp_path):
    """Same seed, same bags -> the same weights, bit for bit (the trainer's promise, small scale)."""
    bags = [train_demo.bag_tensors(small_slide(world, seed=s, positive=s % 2 == 0, n=200)) for s in range(6)]
    runs = []
    for _ in range(2):
        model, _ = train_demo.train(
            train_demo.model_config("early"), bags, seed=3, epochs=1, lr=1e-3, weight_decay=0.05
        )
        runs.append({k: v.clone() for k, v in model.state_dict().items()})
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not torch.equal(runs[0]["pool.sm.sm.coef"], torch.tensor(1.0))  # it did train
