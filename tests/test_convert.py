"""smcli convert: every wrapper training code saves, settings by precedence, nothing assumed quietly."""

from __future__ import annotations

import itertools
import json
import os
import pickle
import sys
import types

import numpy as np
import pytest

pytest.importorskip("torchmil")
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torchmil.models import SmABMIL as TorchmilSmABMIL
from torchmil.models.mil_model import MILModelWrapper
from torchmil.nn import SmAttentionPool as TorchmilPool
from typer.testing import CliRunner

from smcli.bags import load_bag
from smcli.checkpoint import load_model
from smcli.cli import app
from smcli.convert import ConvertOptions, convert
from smcli.errors import ModelError, UsageError
from smcli.scoring import score_bag
from tests.conftest import PATCH, tricky_coords
from tests.oracle import make_torchmil_model, torchmil_adjacency

IN_DIM = 20
FULL_GRAPH = {"dist_thr": 2**0.5, "normalize": True, "weights": "binary", "origin": "min"}


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def train_like(model, coef=2.3):
    """Give a fresh torchmil model a non-default Sm coefficient, as training would."""
    state = model.state_dict()
    for key in state:
        if key.endswith("sm.sm.coef"):
            state[key] = torch.tensor(coef)
    model.load_state_dict(state)
    return model.eval()


def torchmil_model(
    head, mode="approx", where="early", spectral=False, alpha="trainable", act="tanh", steps=10
):
    torch.manual_seed(0)
    return train_like(make_torchmil_model(IN_DIM, 6, head, mode, where, spectral, alpha, act, steps))


def assert_scores_like(model_path, oracle, bag_file, mode="approx"):
    coords = tricky_coords(2)
    features = torch.randn(len(coords), IN_DIM)
    result = score_bag(load_model(model_path), load_bag(bag_file("b", features, coords, patch_size=PATCH)))
    adj = torchmil_adjacency(coords, PATCH)
    with torch.no_grad():
        out = oracle(features[None], (adj.to_dense() if mode == "exact" else adj)[None], return_att=True)
    assert np.abs(result.table["attention_logit"].to_numpy() - out[1][0].numpy()).max() <= 1e-5
    if "pool.proj1.weight" in oracle.state_dict() or hasattr(oracle, "last_layer"):
        assert abs(result.summary.logit - float(out[0][0])) <= 1e-5


CONVERT_CONFIGS = list(
    itertools.product(
        ["approx", "exact"],
        ["early", "mid", "late", "none"],
        [False, True],
        ["trainable", 0.5, 0.9],
        ["tanh", "gelu"],
        [True, False],
    )
)


@pytest.mark.parametrize("mode,where,spectral,alpha,act,head", CONVERT_CONFIGS)
def test_converted_checkpoint_scores_like_torchmil(
    tmp_path, bag_file, mode, where, spectral, alpha, act, head
):
    oracle = torchmil_model(head, mode, where, spectral, alpha, act)
    pt = tmp_path / "model.pt"
    torch.save(oracle.state_dict(), pt)
    out = tmp_path / "model.safetensors"
    options = ConvertOptions(
        act=act,
        sm_mode=mode,
        sm_alpha=None if alpha == "trainable" else alpha,
        sm_steps=10,
        sm_where=where,
        **FULL_GRAPH,
    )
    result = convert(pt, out, options)
    assert result.assumed == ()
    model = load_model(out)
    # torchmil wraps no layer for 'late', so there the flag leaves no trace (and changes nothing)
    assert model.config.head is head
    assert model.config.pool.spectral_norm is (spectral and where != "late")
    assert_scores_like(out, oracle, bag_file, mode)


# --- the files training code writes ------------------------------------------------------------


@pytest.fixture(scope="module")
def ddp():
    """Wrap a module in a real (one-process, gloo) DistributedDataParallel."""
    import tempfile

    import torch.distributed as dist

    store = tempfile.mkdtemp()
    dist.init_process_group("gloo", init_method=f"file://{store}/store", rank=0, world_size=1)
    yield torch.nn.parallel.DistributedDataParallel
    dist.destroy_process_group()


@pytest.fixture
def lightning_attribute_dict(monkeypatch):
    """Lightning's AttributeDict (a dict subclass), importable under its real name for pickling."""
    names = ["lightning", "lightning.fabric", "lightning.fabric.utilities", "lightning.fabric.utilities.data"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    attribute_dict = type("AttributeDict", (dict,), {"__module__": names[-1]})
    monkeypatch.setattr(sys.modules[names[-1]], "AttributeDict", attribute_dict, raising=False)
    return attribute_dict


def lightning_checkpoint(model, hyper_parameters):
    """What Lightning's trainer.save_checkpoint writes for a LightningModule holding `self.model`."""
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(1, 5, IN_DIM), torch.eye(5)[None].to_sparse(), return_att=True)[1].sum().backward()
    optimizer.step()
    model.eval()
    return {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 4}}}},
        "callbacks": {},
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": hyper_parameters,
    }


def test_trainer_ddp_compile_wrappers_convert_and_score_like_torchmil(tmp_path, bag_file, ddp):
    oracle = torchmil_model(True, where="mid", spectral=True, act="gelu", steps=7)
    wrapped = torch.compile(ddp(MILModelWrapper(oracle)))  # Trainer wrapper, then DDP, then compile
    path = tmp_path / "wrapped.pt"
    torch.save({"model_state_dict": wrapped.state_dict(), "epoch": 9}, path)
    assert next(iter(torch.load(path)["model_state_dict"])).startswith("_orig_mod.module.model.pool.")
    result = convert(
        path,
        tmp_path / "m.safetensors",
        ConvertOptions(act="gelu", sm_steps=7, **FULL_GRAPH, assume_defaults=True),
    )
    assert result.found == "'model_state_dict' of a checkpoint dict, prefix _orig_mod.module.model. removed"
    assert result.assumed == ("sm_mode=approx",)  # mid read off the spectral-norm layout
    assert result.config.pool.sm_where == "mid"
    assert_scores_like(tmp_path / "m.safetensors", oracle, bag_file)


def test_lightning_checkpoint_takes_settings_from_hyper_parameters(
    tmp_path, bag_file, lightning_attribute_dict
):
    oracle = torchmil_model(True, mode="exact", where="late", act="relu")
    hyper = lightning_attribute_dict(
        in_shape=(IN_DIM,), att_act="relu", sm_mode="exact", sm_where="late", sm_alpha="trainable", lr=1e-4
    )
    hyper.update(norm_adj=True, adj_with_dist=False, dist_thr=1.5, patch_size=PATCH, weights=[1, 3])
    path = tmp_path / "epoch=3.ckpt"
    torch.save(lightning_checkpoint(oracle, hyper), path)
    result = convert(path, tmp_path / "m.safetensors", ConvertOptions(assume_defaults=True))
    assert result.found == "Lightning checkpoint, prefix model. removed"
    # exact mode: sm_steps plays no part; torchmil has no name for the origin; `weights` is ignored
    assert result.assumed == ("origin=min",)
    pool = result.config.pool
    assert (pool.act, pool.sm_mode, pool.sm_where, result.config.dist_thr) == ("relu", "exact", "late", 1.5)
    assert_scores_like(tmp_path / "m.safetensors", oracle, bag_file, "exact")


def test_flags_override_config_which_overrides_hyper_parameters(tmp_path, lightning_attribute_dict):
    oracle = torchmil_model(False)
    path = tmp_path / "l.ckpt"
    torch.save(
        lightning_checkpoint(oracle, lightning_attribute_dict(act="relu", sm_steps=4, sm_mode="exact")), path
    )
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"act": "tanh", "sm_steps": 6}))
    result = convert(
        path, tmp_path / "m.safetensors", ConvertOptions(act="gelu", config=config, assume_defaults=True)
    )
    pool = result.config.pool
    assert (pool.act, pool.sm_steps, pool.sm_mode) == ("gelu", 6, "exact")
    assert result.notes == [
        f"--act gelu overrides config {config}: act tanh, hyper_parameters: act relu",
        f"config {config}: sm_steps 6 overrides hyper_parameters: sm_steps 4",
    ]


def test_graph_flags_and_config_reach_the_checkpoint(tmp_path):
    pt = tmp_path / "model.pt"
    torch.save(torchmil_model(False, act="gelu").state_dict(), pt)
    config = tmp_path / "dataset.json"
    config.write_text(
        json.dumps({"norm_adj": False, "adj_with_dist": True, "dist_thr": 1.5, "patch_size": 512})
    )
    out = tmp_path / "m.safetensors"
    flags = [
        "--act",
        "gelu",
        "--sm-mode",
        "approx",
        "--sm-steps",
        "10",
        "--sm-where",
        "early",
        "--origin",
        "zero",
    ]
    result = invoke("convert", pt, "-o", out, "--config", config, *flags, "--strict")
    assert result.exit_code == 0, result.stderr
    loaded = load_model(out).config
    assert (loaded.graph.normalize, loaded.graph.weights, loaded.graph.origin) == (
        False,
        "feature_distance",
        "zero",
    )
    assert (loaded.dist_thr, loaded.patch_size) == (1.5, 512.0)
    result = invoke(
        "convert",
        pt,
        "-o",
        out,
        *flags,
        "--normalize",
        "--weights",
        "binary",
        "--config",
        config,
        "--overwrite",
    )
    assert load_model(out).config.graph.normalize is True  # the flag wins over the config
    gauss = invoke("convert", pt, "-o", out, "--weights", "gauss", "--overwrite")
    assert gauss.exit_code == 2 and "--weights" in gauss.stderr


# --- nothing assumed quietly -------------------------------------------------------------------


def test_every_default_is_one_note_line_recorded_and_shown_by_inspect(tmp_path):
    pt = tmp_path / "model.pt"
    torch.save(torchmil_model(True).state_dict(), pt)
    out = tmp_path / "m.safetensors"
    result = invoke("convert", pt, "-o", out, "--assume-defaults")
    assert result.exit_code == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert notes == [
        f"note: {pt}: assumed torchmil defaults act=tanh, sm_mode=approx, sm_steps=10, sm_where=early, "
        "dist_thr=1.41421, normalize=true, weights=binary, origin=min"
    ]
    assumed = load_model(out).config.assumed
    assert assumed[0] == "act=tanh" and len(assumed) == 8
    shown = invoke("inspect", out)
    assert f"  assumed     {', '.join(assumed)}" in shown.stdout.splitlines()


MISSING_LINE = (
    "the file does not record sm_mode (--sm-mode), sm_steps (--sm-steps), sm_where (--sm-where), "
    "dist_thr (--dist-thr), normalize (--normalize/--no-normalize), weights (--weights), origin (--origin); "
    "give them as flags or in --config, or pass --assume-defaults to take torchmil's sm_mode=approx, "
    "sm_steps=10, sm_where=early, dist_thr=1.41421, normalize=true, weights=binary, origin=min"
)


@pytest.mark.parametrize("strict", [[], ["--strict"]])
def test_any_assumption_is_exit_2_by_default_and_strict_is_a_no_op(tmp_path, strict):
    pt = tmp_path / "model.pt"
    torch.save(torchmil_model(False).state_dict(), pt)
    out = tmp_path / "m.safetensors"
    result = invoke("convert", pt, "-o", out, *strict, "--act", "tanh")
    assert result.exit_code == 2
    assert result.stderr == f"error: {pt}: {MISSING_LINE}\n"
    assert not out.exists()
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"sm_mode": "approx", "sm_steps": 10, "sm_where": "early", **FULL_GRAPH}))
    result = invoke("convert", pt, "-o", out, *strict, "--act", "tanh", "--config", config)
    assert result.exit_code == 0, result.stderr
    assert "note:" not in result.stderr
    assert load_model(out).config.assumed == ()


def test_strict_and_assume_defaults_together_are_a_usage_error(tmp_path):
    pt = tmp_path / "model.pt"
    torch.save(torchmil_model(False).state_dict(), pt)
    result = invoke("convert", pt, "-o", tmp_path / "m.safetensors", "--strict", "--assume-defaults")
    assert (result.exit_code, result.stderr) == (
        2,
        "error: --strict and --assume-defaults exclude each other\n",
    )


# each row of issue 10's table: a mistake that used to convert silently (the model as trained)
ISSUE_ROWS = [
    ({"mode": "exact"}, "sm_mode=approx"),
    ({"where": "late", "spectral": True}, "sm_where=early"),
    ({"act": "gelu"}, "act=tanh"),
    ({"steps": 20}, "sm_steps=10"),
    ({}, "normalize=true"),  # trained on a dataset with norm_adj=False
    ({}, "weights=binary"),  # trained with adj_with_dist=True
]


@pytest.mark.parametrize("trained,assumption", ISSUE_ROWS)
def test_issue_table_rows_are_errors_unless_defaults_are_assumed(tmp_path, trained, assumption):
    pt = tmp_path / "model.pt"
    torch.save(torchmil_model(True, **trained).state_dict(), pt)
    result = convert(pt, tmp_path / "m.safetensors", ConvertOptions(assume_defaults=True))
    assert assumption in result.assumed
    name = assumption.partition("=")[0]
    for options in (ConvertOptions(), ConvertOptions(strict=True)):
        with pytest.raises(ModelError, match=f"does not record .*{name} .*--assume-defaults"):
            convert(pt, tmp_path / "s.safetensors", options)


# --- contradictions and bad input --------------------------------------------------------------


def save_pool(tmp_path, **kwargs):
    torch.manual_seed(0)
    path = tmp_path / "pool.pt"
    torch.save(TorchmilPool(IN_DIM, 6, **kwargs).state_dict(), path)
    return path


@pytest.mark.parametrize(
    "kwargs,options,message",
    [
        ({}, ConvertOptions(sm_alpha=0.5), "--sm-alpha 0.5 contradicts the tensors: sm.sm.coef is present"),
        ({"sm_alpha": 0.5}, ConvertOptions(), "no sm.sm.coef tensor"),
        ({"sm_alpha": 0.5}, ConvertOptions(sm_alpha="trainable"), "there is no sm.sm.coef tensor"),
        (
            {"spectral_norm": True},
            ConvertOptions(sm_where="late"),
            "on proj1 and proj2 do not fit --sm-where late",
        ),
        ({"spectral_norm": True, "sm_where": "mid"}, ConvertOptions(sm_where="early"), "on proj2 only"),
        ({}, ConvertOptions(sm_where="none"), "--sm-where none contradicts the tensors"),
    ],
)
def test_convert_refuses_settings_that_contradict_the_tensors(tmp_path, kwargs, options, message):
    with pytest.raises(ModelError, match=message):
        convert(save_pool(tmp_path, **kwargs), tmp_path / "out.safetensors", options)
    assert not (tmp_path / "out.safetensors").exists()


def test_config_in_dim_must_match_the_tensors(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"in_dim": 512}))
    with pytest.raises(
        ModelError, match=f"config {config}: in_dim 512 contradicts the tensors: they have in_dim 20"
    ):
        convert(save_pool(tmp_path), tmp_path / "out.safetensors", ConvertOptions(config=config))


def test_config_spectral_norm_must_match_the_tensors(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"spectral_norm": True, "sm_where": "early"}))
    with pytest.raises(
        ModelError, match="spectral_norm true contradicts the tensors: they have spectral norm on no"
    ):
        convert(save_pool(tmp_path), tmp_path / "out.safetensors", ConvertOptions(config=config))


@pytest.mark.parametrize(
    "text,message",
    [
        ('{"sm_mode": "approx", "learning_rate": 0.1}', "unknown key 'learning_rate'"),
        ("sm_mode: approx\n", "not valid JSON .*--config reads JSON only"),
        ('["sm_mode"]', "must be a JSON object"),
        ('{"sm_where": "everywhere"}', "sm_where: sm_where must be one of early, mid, late, none"),
        ('{"norm_adj": "yes"}', "norm_adj: normalize must be true or false"),
        ('{"act": "tanh", "att_act": "gelu"}', "att_act = 'gelu' contradicts another key for act"),
    ],
)
def test_bad_config_file_exits_2_naming_file_and_key(tmp_path, text, message):
    config = tmp_path / "train.yaml"
    config.write_text(text)
    result = invoke("convert", save_pool(tmp_path), "-o", tmp_path / "o.safetensors", "--config", config)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {config}: ")
    assert len(result.stderr.splitlines()) == 1
    with pytest.raises(UsageError, match=message):
        convert(save_pool(tmp_path), tmp_path / "o.safetensors", ConvertOptions(config=config))


def test_convert_refuses_feature_extractor_naming_its_tensors(tmp_path):
    model = TorchmilSmABMIL((7,), att_dim=5, feat_ext=torch.nn.Sequential(torch.nn.Linear(7, IN_DIM)))
    path = tmp_path / "fe.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(ModelError, match=r"feature extractor \(feat_ext.0.bias, feat_ext.0.weight\)"):
        convert(path, tmp_path / "out.safetensors", ConvertOptions())


def test_convert_refuses_foreign_tensors(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(ModelError, match="no proj1 weight"):
        convert(path, tmp_path / "out.safetensors", ConvertOptions())
    torch.save({"optimizer": {"lr": 0.1}, "epoch": 3}, path)
    with pytest.raises(ModelError, match="holds no state dict .* its keys: epoch, optimizer"):
        convert(path, tmp_path / "out.safetensors", ConvertOptions())


class _CreatesFile:
    """Unpickling this object would create a file: the attack weights_only must stop."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize(
    "wrap", [lambda evil: {"proj1.weight": evil}, lambda evil: {"state_dict": {"a": evil}}]
)
def test_convert_never_runs_a_malicious_pickle(tmp_path, wrap):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump(wrap(_CreatesFile(str(target))), handle)
    with pytest.raises(ModelError, match="refused to load"):
        convert(path, tmp_path / "out.safetensors", ConvertOptions())
    assert not target.exists()


# --- property: any wrapper x prefixes x where the settings come from ---------------------------

SETTING_VALUES = {
    "act": "relu",
    "sm_mode": "exact",
    "sm_where": "late",
    "dist_thr": 2.0,
    "origin": "zero",
    "weights": "feature_distance",
}
TORCHMIL_NAMES = {
    "act": ("att_act", "relu"),
    "weights": ("adj_with_dist", True),
}  # a training config's spelling


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    wrapper=st.sampled_from(["bare", "state_dict", "model", "model_state_dict", "lightning"]),
    prefixes=st.lists(st.sampled_from(["model.", "module.", "_orig_mod."]), max_size=3),
    placement=st.fixed_dictionaries(
        {
            name: st.sampled_from(["flag", "config", "absent"] + ([] if name == "origin" else ["hparams"]))
            for name in SETTING_VALUES
        }
    ),
    torchmil_spelling=st.booleans(),
)
def test_any_wrapper_prefix_and_settings_source_converts_the_same(
    tmp_path_factory, lightning_attribute_dict, wrapper, prefixes, placement, torchmil_spelling
):
    tmp_path = tmp_path_factory.mktemp("case")
    oracle = torchmil_model(True, mode="exact", where="late", act="relu")
    state = {"".join(prefixes) + k: v for k, v in oracle.state_dict().items()}
    if wrapper == "lightning" and "hparams" not in placement.values():
        wrapper = "state_dict"
    flags = {k: v for k, v in SETTING_VALUES.items() if placement[k] == "flag"}
    in_config = dict(
        TORCHMIL_NAMES.get(k, (k, v)) if torchmil_spelling else (k, v)
        for k, v in SETTING_VALUES.items()
        if placement[k] == "config"
    )
    # hyper_parameters count only under torchmil's names (origin has none)
    hparams = dict(
        TORCHMIL_NAMES.get(k, (k, v)) for k, v in SETTING_VALUES.items() if placement[k] == "hparams"
    )
    if wrapper == "bare":
        document: dict = state
    elif wrapper == "lightning":
        hparams.update(lr=0.01, weights=[0.3, 0.7], origin="imagenet")  # the script's own: ignored
        document = {"state_dict": state, "hyper_parameters": lightning_attribute_dict(hparams), "epoch": 1}
    else:
        document = {wrapper: state, "epoch": 1, "hyper_parameters": hparams}
    path = tmp_path / "m.pt"
    torch.save(document, path)
    config_path = None
    if in_config:
        config_path = tmp_path / "c.json"
        config_path.write_text(json.dumps(in_config))
    result = convert(
        path, tmp_path / "m.safetensors", ConvertOptions(config=config_path, **flags, assume_defaults=True)
    )

    stated = {
        k for k, where in placement.items() if where != "absent" and (where != "hparams" or wrapper != "bare")
    }
    pool, graph = result.config.pool, result.config.graph
    resolved = {
        "act": pool.act,
        "sm_mode": pool.sm_mode,
        "sm_where": pool.sm_where,
        "dist_thr": result.config.dist_thr,
        "origin": graph.origin,
        "weights": graph.weights,
    }
    for name in SETTING_VALUES:
        if name in stated:
            assert resolved[name] == SETTING_VALUES[name]
        else:
            assert any(item.startswith(name + "=") for item in result.assumed)
    loaded = load_model(tmp_path / "m.safetensors").module.state_dict()
    assert loaded.keys() == oracle.state_dict().keys()
    assert all(np.array_equal(loaded[k], v.numpy()) for k, v in oracle.state_dict().items())


# --- property: bad input of every kind is one SmcliError, never a crash ------------------------

JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.sampled_from(
        ["approx", "exact", "early", "late", "none", "tanh", "trainable", "min", "zero", "binary"]
    ),
    st.text(max_size=5),
    st.lists(st.integers(0, 3000), max_size=2),
)
CONFIG_KEYS = st.sampled_from(
    ["in_dim", "in_shape", "att_dim", "act", "att_act", "sm_mode", "sm_alpha", "sm_steps", "sm_where"]
    + ["spectral_norm", "patch_size", "dist_thr", "normalize", "norm_adj", "weights", "adj_with_dist"]
    + ["origin", "lr", "Sm_mode"]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=st.dictionaries(CONFIG_KEYS, JSON_VALUES, max_size=5), as_hyper_parameters=st.booleans())
def test_any_config_or_hyper_parameters_converts_or_is_one_clean_error(
    tmp_path_factory, document, as_hyper_parameters
):
    from smcli.errors import SmcliError

    tmp_path = tmp_path_factory.mktemp("fuzz")
    state = torchmil_model(False, act="gelu").state_dict()
    path = tmp_path / "m.pt"
    config = None
    if as_hyper_parameters:
        torch.save({"state_dict": state, "hyper_parameters": document}, path)
    else:
        torch.save(state, path)
        config = tmp_path / "c.json"
        config.write_text(json.dumps(document))
    out = tmp_path / "m.safetensors"
    try:
        result = convert(path, out, ConvertOptions(config=config))
    except SmcliError as err:
        named = (f"{path}: ",) if config is None else (f"{path}: ", f"{config}: ")
        assert "\n" not in str(err) and str(err).startswith(named)
        assert not out.exists()
    else:
        assert load_model(out).config == result.config


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(max_size=300), zipped=st.booleans())
def test_any_bytes_as_the_training_file_are_one_model_error(tmp_path_factory, payload, zipped):
    import zipfile

    path = tmp_path_factory.mktemp("bytes") / "junk.pt"
    if zipped:  # torch.save's container with garbage inside
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", payload)
    else:
        path.write_bytes(payload)
    with pytest.raises(ModelError) as err:
        convert(path, path.with_suffix(".safetensors"), ConvertOptions())
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)
