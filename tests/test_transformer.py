"""SmTransformerABMIL: parity with torchmil 1.0.2 (built here), blocked attention, config checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchmil")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torchmil.models import SmTransformerABMIL as TorchmilTransformer  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import smcli  # noqa: E402
from smcli.backends import cpu as cpu_backend  # noqa: E402
from smcli.backends import get_backend  # noqa: E402
from smcli.bags import load_bag  # noqa: E402
from smcli.checkpoint import CONFIG_KEY, ModelConfig, PoolConfig, build_module, load_model  # noqa: E402
from smcli.cli import app  # noqa: E402
from smcli.errors import ModelError  # noqa: E402
from smcli.graph import build_adjacency, grid_cells  # noqa: E402
from smcli.scoring import score_bag  # noqa: E402
from smcli.tensorfile import read_safetensors, write_safetensors  # noqa: E402
from smcli.transformer import TransformerConfig  # noqa: E402
from tests.conftest import PATCH, tricky_coords  # noqa: E402
from tests.oracle import torchmil_adjacency  # noqa: E402

IN_DIM = 12
BACKENDS = ["cpu", "torch:cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# (transformer sm_mode, transformer alpha, n_layers, att_dim, use_mlp, add_self,
#  pool sm_mode, pool sm_where, pool spectral_norm): every pool sm_where in both modes, encoder Sm
# exact and approx, 1-3 layers, MLP and add_self on and off, att_dim != in_dim with one layer (and
# with several when add_self is off: torchmil runs that too), spectral norm on the pool
GRID = [
    ("approx", "trainable", 1, 8, True, True, "approx", "early", False),
    ("approx", "trainable", 1, 8, False, False, "exact", "early", True),
    ("exact", "trainable", 1, 16, True, False, "approx", "mid", True),
    ("exact", 0.5, 1, 8, False, True, "exact", "mid", False),
    ("approx", 0.3, 2, IN_DIM, True, True, "approx", "late", False),
    ("exact", "trainable", 2, IN_DIM, False, False, "exact", "late", True),
    ("approx", "trainable", 3, IN_DIM, True, True, "approx", "none", True),
    ("exact", 0.7, 3, IN_DIM, True, False, "exact", "none", False),
    ("approx", 0.0, 1, 4, True, True, "approx", "early", False),  # alpha 0: the encoder's Sm is A^T
    ("approx", "trainable", 2, 8, True, False, "exact", "early", False),  # att_dim != in_dim, 2 layers
]


def torchmil_transformer(config, seed=0, n_heads=2, pool_act="tanh", dropout=0.0):
    """A torchmil SmTransformerABMIL with every weight moved off its init (LayerNorms, coefs too)."""
    mode, alpha, layers, att, mlp, add_self, pool_mode, where, spectral = config
    torch.manual_seed(seed)
    model = TorchmilTransformer(
        (IN_DIM,),
        pool_att_dim=6,
        pool_act=pool_act,
        pool_sm_mode=pool_mode,
        pool_sm_where=where,
        pool_spectral_norm=spectral,
        transf_att_dim=att,
        transf_n_layers=layers,
        transf_n_heads=n_heads,
        transf_use_mlp=mlp,
        transf_add_self=add_self,
        transf_dropout=dropout,
        transf_sm_alpha=alpha,
        transf_sm_mode=mode,
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("sm.sm.coef"):
                parameter.fill_(1.0 + torch.rand(()).item() * 2)
            else:
                parameter.add_(0.2 * torch.randn_like(parameter))
    return model.eval()


def torchmil_scores(model, features, coords, dense):
    adj = torchmil_adjacency(coords, PATCH)
    adj = adj.to_dense() if dense else adj  # torchmil's exact Sm solves a dense system
    with torch.no_grad():
        logit, attention = model(features[None], adj[None], return_att=True)
    return float(logit[0]), attention[0].numpy()


def needs_dense(config) -> bool:
    return "exact" in (config[0], config[6])


def smcli_config(config, n_heads=2, pool_act="tanh") -> ModelConfig:
    mode, alpha, layers, att, mlp, add_self, pool_mode, where, spectral = config
    pool = PoolConfig(IN_DIM, 6, pool_act, pool_mode, "trainable", 10, where, spectral)
    transformer = TransformerConfig(IN_DIM, att, layers, n_heads, mlp, add_self, 0.0, alpha, mode, 10)
    return ModelConfig(pool, head=True, transformer=transformer)


def as_numpy(array):
    return array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)


@pytest.mark.parametrize("config", GRID, ids=[f"{c[0]}-{c[2]}L-att{c[3]}-{c[6]}-{c[7]}" for c in GRID])
def test_logits_match_torchmil(config):
    coords = tricky_coords(2)
    features = torch.randn(len(coords), IN_DIM, generator=torch.Generator().manual_seed(3))
    oracle = torchmil_transformer(config)
    expected_logit, expected = torchmil_scores(oracle, features, coords, needs_dense(config))
    adjacency = build_adjacency(grid_cells(coords, PATCH))
    state = {k: v for k, v in oracle.state_dict().items() if not k.startswith("criterion.")}
    for backend in BACKENDS:
        ours = build_module(smcli_config(config)).to(backend)
        ours.load_state_dict(state, strict=True)
        result = ours.attention(features.numpy(), adjacency, symmetric=True)
        assert np.abs(as_numpy(result.attention_logit) - expected).max() <= 1e-5, backend
        assert abs(result.bag_logit - expected_logit) <= 1e-5, backend
        reference_logit, reference = ours.forward_reference(features.numpy(), adjacency)
        assert np.abs(as_numpy(reference) - expected).max() <= 1e-5, backend
        assert abs(reference_logit - expected_logit) <= 1e-5, backend


@pytest.mark.parametrize("n_heads", [1, 4])
@pytest.mark.parametrize("pool_act", ["relu", "gelu"])
def test_heads_and_pool_activation_are_read_from_the_export(tmp_path, bag_file, n_heads, pool_act):
    config = ("approx", "trainable", 2, IN_DIM, True, True, "approx", "mid", False)
    coords = tricky_coords(5)
    features = torch.randn(len(coords), IN_DIM)
    oracle = torchmil_transformer(config, seed=4, n_heads=n_heads, pool_act=pool_act)
    exported = smcli.export_torchmil(oracle, tmp_path / "t.safetensors", patch_size=PATCH)
    assert exported.transformer is not None
    assert (exported.transformer.n_heads, exported.pool.act) == (n_heads, pool_act)
    expected_logit, expected = torchmil_scores(oracle, features, coords, dense=False)
    result = score_bag(load_model(tmp_path / "t.safetensors"), load_bag(bag_file("b", features, coords)))
    assert np.abs(result.table["attention_logit"].to_numpy() - expected).max() <= 1e-5
    assert abs(result.summary.logit - expected_logit) <= 1e-5


def _training_bags(n_bags=4):
    from tensordict import TensorDict

    bags = []
    for index in range(n_bags):
        coords = tricky_coords(10 + index)
        features = torch.randn(len(coords), IN_DIM, generator=torch.Generator().manual_seed(index))
        adj = torchmil_adjacency(coords, PATCH).to_dense()
        label = torch.tensor(float(index % 2))
        bags.append((coords, features, TensorDict({"X": features, "adj": adj, "Y": label})))
    return bags


@pytest.mark.parametrize("modes", [("approx", "approx"), ("exact", "exact")])
def test_a_model_trained_with_torchmils_trainer_exports_exactly(tmp_path, bag_file, modes):
    """Two epochs of torchmil's own Trainer (Adam), then export -> load -> score vs torchmil's forward."""
    from torchmil.data import collate_fn
    from torchmil.utils.trainer import Trainer

    transformer_mode, pool_mode = modes
    torch.manual_seed(7)
    model = TorchmilTransformer(
        (IN_DIM,),
        pool_att_dim=6,
        pool_sm_mode=pool_mode,
        transf_att_dim=8,
        transf_n_heads=2,
        transf_sm_mode=transformer_mode,
        transf_add_self=True,
    )
    bags = _training_bags()
    loader = torch.utils.data.DataLoader([bag for _, _, bag in bags], batch_size=1, collate_fn=collate_fn)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(
        model, torch.optim.Adam(model.parameters(), lr=0.05), device="cpu", disable_pbar=True, verbose=False
    )
    trainer.train(max_epochs=2, train_dataloader=loader)
    coef = "transformer_encoder.layers.0.att_module.sm.sm.coef"
    assert not torch.equal(before[coef], model.state_dict()[coef])  # training moved the encoder
    model.eval()
    smcli.export_torchmil(model, tmp_path / "trained.safetensors", patch_size=PATCH)
    loaded = load_model(tmp_path / "trained.safetensors")
    for index, (coords, features, _) in enumerate(bags):
        expected_logit, expected = torchmil_scores(model, features, coords, dense=True)
        result = score_bag(loaded, load_bag(bag_file(f"b{index}", features, coords)))
        assert np.abs(result.table["attention_logit"].to_numpy() - expected).max() <= 1e-5
        assert abs(result.summary.logit - expected_logit) <= 1e-5


def test_dropout_is_noted_and_scored_as_the_deterministic_model(tmp_path, bag_file):
    config = ("approx", "trainable", 1, 8, True, True, "approx", "early", False)
    model = torchmil_transformer(config, dropout=0.25)
    with pytest.warns(UserWarning, match=r"^note: the transformer's dropout 0\.25 is not applied"):
        exported = smcli.export_torchmil(model, tmp_path / "d.safetensors", patch_size=PATCH)
    assert exported.transformer is not None and exported.transformer.dropout == 0.25
    coords = tricky_coords(1)
    features = torch.randn(len(coords), IN_DIM)
    first = torchmil_scores(model, features, coords, dense=False)[1]
    assert not np.array_equal(first, torchmil_scores(model, features, coords, dense=False)[1])  # quirk
    model.transformer_encoder.layers[0].att_module.dropout = 0.0
    expected = torchmil_scores(model, features, coords, dense=False)[1]
    result = score_bag(load_model(tmp_path / "d.safetensors"), load_bag(bag_file("b", features, coords)))
    assert np.abs(result.table["attention_logit"].to_numpy() - expected).max() <= 1e-5


def _layers_differ():
    model = torchmil_transformer(("approx", "trainable", 2, IN_DIM, True, True, "approx", "early", False))
    model.transformer_encoder.layers[1].att_module.n_heads = 4
    return model


def _tanh_gelu():
    model = torchmil_transformer(("approx", "trainable", 1, 8, True, True, "approx", "early", False))
    model.transformer_encoder.layers[0].mlp_module[1] = torch.nn.GELU(approximate="tanh")
    return model


@pytest.mark.parametrize(
    "build,message",
    [
        (_layers_differ, r"^export_torchmil: the transformer's layers differ in att_dim, n_heads"),
        (
            _tanh_gelu,
            r"^export_torchmil: transformer_encoder\.layers\.0\.mlp_module\.1 is GELU\(approximate='tanh'\)",
        ),
    ],
)
def test_export_refuses_a_transformer_it_cannot_reproduce(tmp_path, build, message):
    with pytest.raises(ModelError, match=message):
        smcli.export_torchmil(build(), tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("rows,tile", [(16, 16), (16, 50), (64, 1000), (256, 2048)])
def test_tiled_attention_is_the_softmax_whatever_the_tiles(monkeypatch, rows, tile):
    """Online softmax over key tiles (down to 16 x 16) gives the dense softmax(QK^T/sqrt d)V."""
    monkeypatch.setattr(cpu_backend, "ATTENTION_QUERY_ROWS", rows)
    monkeypatch.setattr(cpu_backend, "ATTENTION_KEY_TILE", tile)
    rng = np.random.default_rng(0)
    query, key, value = (rng.standard_normal((3, 203, 5)).astype(np.float32) * 3 for _ in range(3))
    key[0] = key[0][np.argsort(key[0][:, 0])]  # head 0: scores grow along the keys, the max moves
    out = get_backend("cpu").scaled_dot_product_attention(query, key, value)
    scores = np.einsum("hqd,hkd->hqk", query.astype(np.float64), key.astype(np.float64)) / np.sqrt(5)
    weights = np.exp(scores - scores.max(axis=2, keepdims=True))
    expected = np.einsum("hqk,hkd->hqd", weights / weights.sum(axis=2, keepdims=True), value)
    assert out.shape == (3, 203, 5) and out.dtype == np.float32
    assert np.abs(out - expected).max() <= 1e-5


def test_tiled_attention_never_holds_an_n_by_n_matrix(monkeypatch):
    """The largest array allocated is rows x tile (spied on np.empty / np.zeros), never O(N^2)."""
    sizes = []
    real_empty, real_zeros = np.empty, np.zeros

    def spy(real):
        def allocate(shape, dtype=float, *args, **kwargs):
            if np.dtype(dtype) != np.uint8:  # backend.empty's raw bytes: the (heads, N, head_dim) output
                sizes.append(int(np.prod(shape)))
            return real(shape, dtype, *args, **kwargs)

        return allocate

    n = 4000
    monkeypatch.setattr(cpu_backend.np, "empty", spy(real_empty))
    monkeypatch.setattr(cpu_backend.np, "zeros", spy(real_zeros))
    rng = np.random.default_rng(1)
    query, key, value = (rng.standard_normal((2, n, 4)).astype(np.float32) for _ in range(3))
    get_backend("cpu").scaled_dot_product_attention(query, key, value)
    assert max(sizes) == cpu_backend.ATTENTION_QUERY_ROWS * cpu_backend.ATTENTION_KEY_TILE
    assert max(sizes) < n * n // 10


def _checkpoint_with(tmp_path, **changes):
    """A valid transformer checkpoint whose stored transformer section gets `changes`."""
    config = smcli_config(("approx", "trainable", 2, IN_DIM, True, True, "approx", "early", False))
    path = tmp_path / "base.safetensors"
    smcli.checkpoint.save_checkpoint(build_module(config).state_dict(), config, path)
    read = read_safetensors(path)
    document = json.loads(read.metadata[CONFIG_KEY])
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            document[section][name] = value
        elif value is None:
            del document[section]
        else:
            document[section] = value
    bad = tmp_path / "bad.safetensors"
    write_safetensors(bad, dict(read.tensors), {CONFIG_KEY: json.dumps(document)})
    return bad


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"transformer__att_dim": 8}, r"add_self with 2 layers needs att_dim == in_dim \(8 != 12\)"),
        ({"transformer__n_heads": 5}, r"att_dim 12 is not divisible by n_heads 5"),
        ({"transformer__in_dim": 10}, r"transformer in_dim 10 is not the pool's in_dim 12"),
        ({"head": False}, r"a transformer model has a head \(last_layer\): head must be true"),
        ({"transformer__heads": 2}, r"transformer has unknown settings heads"),
        ({"transformer__use_mlp": "yes"}, r"transformer use_mlp must be true or false"),
        (
            {"transformer__n_layers": 1},
            r"tensors do not fit the config: unexpected transformer_encoder\.layers\.1",
        ),
        ({"transformer__sm_mode": "fast"}, r"transformer sm_mode must be approx or exact"),
        ({"transformer__n_heads": 0}, r"transformer n_heads must be a positive integer"),
    ],
)
def test_loading_refuses_an_inconsistent_transformer_config(tmp_path, changes, message):
    path = _checkpoint_with(tmp_path, **changes)
    with pytest.raises(ModelError, match=message) as caught:
        load_model(path)
    assert "\n" not in str(caught.value) and str(caught.value).startswith(str(path))


def test_scoring_with_an_inconsistent_transformer_is_one_line_exit_2(tmp_path, bag_file):
    path = _checkpoint_with(tmp_path, transformer__n_heads=5)
    coords = tricky_coords(0)
    bag = bag_file("slide", torch.randn(len(coords), IN_DIM), coords, patch_size=PATCH)
    result = CliRunner().invoke(app, ["score", str(bag), "-m", str(path), "--device", "cpu"])
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: {path}: invalid config: transformer att_dim 12 is not divisible by n_heads 5\n"
    )
    assert result.stdout == ""


def test_transformer_checkpoint_scores_without_importing_torch(tmp_path):
    """The CPU path stays torch-free for the transformer too (a fresh interpreter)."""
    import subprocess
    import sys

    config = smcli_config(("exact", "trainable", 1, 8, True, True, "approx", "mid", False))
    model_path = tmp_path / "t.safetensors"
    smcli.checkpoint.save_checkpoint(build_module(config).state_dict(), config, model_path)
    coords = tricky_coords(0)
    bag = tmp_path / "bag.safetensors"
    write_safetensors(
        bag,
        {"features": np.ones((len(coords), IN_DIM), np.float32), "coords": coords},
        {"patch_size": str(PATCH)},
    )
    script = (
        "import sys; from smcli.checkpoint import load_model; from smcli.bags import load_bag; "
        "from smcli.scoring import score_bag; "
        f"r = score_bag(load_model({str(model_path)!r}), load_bag({str(bag)!r})); "
        "assert r.summary.logit == r.summary.logit; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", script], check=True)


def test_inspect_shows_the_architecture(tmp_path):
    config = smcli_config(("exact", 0.5, 2, IN_DIM, False, True, "approx", "late", True), n_heads=3)
    path = tmp_path / "t.safetensors"
    smcli.checkpoint.save_checkpoint(build_module(config).state_dict(), config, path)
    result = CliRunner().invoke(app, ["inspect", str(path)])
    assert result.exit_code == 0
    lines = dict(line.strip().split(None, 1) for line in result.stdout.splitlines()[1:])
    assert lines["model"] == "SmTransformerABMIL (in_dim 12, head yes)"
    assert lines["layout"] == (
        "SmTransformerEncoder [2 layers x 3 heads (head_dim 4); in_dim 12 -> att_dim 12; no MLP; add_self; "
        "Sm exact, alpha 0.5] -> SmAttentionPool [in_dim 12 -> att_dim 6, tanh; Sm approx, trainable alpha, "
        "10 steps (late); spectral norm] -> Linear [12 -> 1]"
    )
    assert lines["transformer"].startswith("add_self True, att_dim 12, dropout 0.0, in_dim 12, n_heads 3")


def _saved_training_file(tmp_path, model, name="t.pt"):
    """What a Trainer run leaves: the state dict under `state_dict`, keys prefixed `model.`."""
    path = tmp_path / name
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


def _convert(*args):
    return CliRunner().invoke(app, ["convert", *map(str, args)])


def test_convert_with_n_heads_and_config_scores_like_torchmil(tmp_path, bag_file):
    config = ("exact", 0.4, 2, IN_DIM, True, False, "approx", "mid", True)
    model = torchmil_transformer(config, seed=9, n_heads=3)
    settings = {
        "transf_sm_mode": "exact",
        "transf_sm_alpha": 0.4,
        "transf_add_self": False,
        "pool_sm_where": "mid",
        "pool_sm_mode": "approx",
        "pool_sm_steps": 10,
        "pool_act": "tanh",
        "pool_spectral_norm": True,
        "patch_size": PATCH,
        "dist_thr": 2**0.5,
        "normalize": True,
        "weights": "binary",
        "origin": "min",
    }
    (tmp_path / "c.json").write_text(json.dumps(settings))
    out = tmp_path / "t.safetensors"
    result = _convert(
        _saved_training_file(tmp_path, model),
        "-o",
        out,
        "--n-heads",
        3,
        "--config",
        tmp_path / "c.json",
        "--strict",
    )
    assert result.exit_code == 0, result.stderr
    assert "SmTransformerABMIL" in result.stderr
    loaded = load_model(out)
    assert loaded.config.transformer == TransformerConfig(
        IN_DIM, IN_DIM, 2, 3, True, False, 0.0, 0.4, "exact", 10
    )
    coords = tricky_coords(4)
    features = torch.randn(len(coords), IN_DIM)
    expected_logit, expected = torchmil_scores(model, features, coords, dense=True)
    scored = score_bag(loaded, load_bag(bag_file("b", features, coords)))
    assert np.abs(scored.table["attention_logit"].to_numpy() - expected).max() <= 1e-5
    assert abs(scored.summary.logit - expected_logit) <= 1e-5


@pytest.mark.parametrize(
    "args,settings,message",
    [
        (
            [],
            {},
            "n_heads is not in the tensors: give --n-heads (or transf_n_heads in --config); "
            "it must divide att_dim 8",
        ),
        (["--n-heads", 3], {}, "transformer att_dim 8 is not divisible by n_heads 3"),
        (
            ["--n-heads", 2],
            {"transf_att_dim": 16},
            "config CONFIG: transf_att_dim 16 contradicts the tensors: they have transf_att_dim 8",
        ),
        (
            ["--n-heads", 2],
            {"transf_sm_alpha": 0.5},
            "config CONFIG: transf_sm_alpha 0.5 contradicts the tensors: the encoder's sm.sm.coef is there, "
            "so its alpha was trainable",
        ),
    ],
)
def test_convert_refuses_a_transformer_it_cannot_pin_down(tmp_path, args, settings, message):
    model = torchmil_transformer(("approx", "trainable", 1, 8, True, True, "approx", "early", False))
    config = tmp_path / "c.json"
    config.write_text(json.dumps(settings))
    pt = _saved_training_file(tmp_path, model)
    result = _convert(pt, "-o", tmp_path / "m.safetensors", "--config", config, *args)
    assert result.exit_code == 2
    assert result.stderr == f"error: {pt}: {message.replace('CONFIG', str(config))}\n"
    assert not (tmp_path / "m.safetensors").exists()


def test_convert_notes_the_dropout_and_the_assumed_encoder_defaults(tmp_path):
    model = torchmil_transformer(
        ("approx", "trainable", 1, 8, True, True, "approx", "early", False), dropout=0.2
    )
    pt = _saved_training_file(tmp_path, model)
    (tmp_path / "c.json").write_text(json.dumps({"transf_dropout": 0.2}))  # the tensors cannot say it
    refused = _convert(pt, "-o", tmp_path / "m.safetensors", "--n-heads", 2, "--config", tmp_path / "c.json")
    assert refused.exit_code == 2
    assert "transf_add_self (--config), transf_sm_mode (--config)" in refused.stderr
    result = _convert(
        pt,
        "-o",
        tmp_path / "m.safetensors",
        "--n-heads",
        2,
        "--config",
        tmp_path / "c.json",
        "--assume-defaults",
    )
    assert result.exit_code == 0
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"note: {pt}: assumed torchmil defaults act=tanh, sm_mode=approx")
    assert lines[0].endswith("transf_add_self=true, transf_sm_mode=approx, transf_sm_steps=10")
    assert lines[1] == (
        f"note: {pt}: the transformer's dropout 0.2 is not applied: torchmil passes it to "
        "scaled_dot_product_attention even in eval mode (its own eval scores are random); smcli scores "
        "the deterministic model without dropout"
    )


DEMO = Path(__file__).resolve().parent.parent / "sample_bags" / "models" / "sm_transformer_abmil.safetensors"


def torchmil_from_checkpoint(config: ModelConfig, tensors: dict):
    """torchmil's SmTransformerABMIL built from an smcli config, the checkpoint's tensors loaded strictly."""
    pool, transformer = config.pool, config.transformer
    assert transformer is not None
    model = TorchmilTransformer(
        (pool.in_dim,),
        pool_att_dim=pool.att_dim,
        pool_act=pool.act,
        pool_sm_mode=pool.sm_mode,
        pool_sm_alpha=pool.sm_alpha,
        pool_sm_steps=pool.sm_steps,
        pool_sm_where=pool.sm_where,
        pool_spectral_norm=pool.spectral_norm,
        transf_att_dim=transformer.att_dim,
        transf_n_layers=transformer.n_layers,
        transf_n_heads=transformer.n_heads,
        transf_use_mlp=transformer.use_mlp,
        transf_add_self=transformer.add_self,
        transf_sm_alpha=transformer.sm_alpha,
        transf_sm_mode=transformer.sm_mode,
        transf_sm_steps=transformer.sm_steps,
    )
    state = {name: torch.from_numpy(np.array(value)) for name, value in tensors.items()}
    state.update({f"criterion.{k}": v for k, v in model.criterion.state_dict().items()})
    model.load_state_dict(state, strict=True)
    return model.eval()


def test_the_demo_transformer_scores_the_sample_slides_as_torchmil_does():
    """The committed demo checkpoint (trained with torchmil) against torchmil's forward, from the files."""
    loaded = load_model(DEMO)
    assert loaded.config.kind == "SmTransformerABMIL"
    oracle = torchmil_from_checkpoint(loaded.config, dict(read_safetensors(DEMO).tensors))
    for name in ("slide_01", "slide_02"):
        bag = load_bag(DEMO.parent.parent / f"{name}.safetensors")
        result = score_bag(loaded, bag)
        features = torch.from_numpy(bag.features.astype(np.float32))
        expected_logit, expected = torchmil_scores(oracle, features, bag.coords * PATCH / 512, dense=False)
        assert np.abs(result.table["attention_logit"].to_numpy() - expected).max() <= 1e-5
        assert abs(result.summary.logit - expected_logit) <= 1e-5


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 40), layers=st.integers(1, 3))
def test_permuting_the_patches_permutes_the_scores(seed, n, layers):
    """Self-attention, Sm and the pool are permutation-equivariant; the bag logit is invariant."""
    rng = np.random.default_rng(seed)
    config = smcli_config(("approx", "trainable", layers, IN_DIM, True, layers == 1, "exact", "mid", False))
    model = build_module(config, seed=seed)
    coords = np.unique(rng.integers(0, 8, size=(n, 2)), axis=0) * PATCH
    features = rng.standard_normal((len(coords), IN_DIM)).astype(np.float32)
    order = rng.permutation(len(coords))
    first = model.attention(features, build_adjacency(grid_cells(coords, PATCH)), symmetric=True)
    second = model.attention(
        features[order], build_adjacency(grid_cells(coords[order], PATCH)), symmetric=True
    )
    assert np.allclose(
        np.asarray(second.attention_logit), np.asarray(first.attention_logit)[order], atol=1e-5
    )
    assert abs(second.bag_logit - first.bag_logit) <= 1e-5
