"""Checkpoints: convert torchmil state dicts, refuse unsafe or inconsistent ones, load safely."""

from __future__ import annotations

import itertools
import json
import os
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torchmil.models import SmABMIL as TorchmilSmABMIL
from torchmil.nn import SmAttentionPool as TorchmilPool

from smcli.bags import load_bag
from smcli.checkpoint import CONFIG_KEY, ConvertOptions, convert, load_model
from smcli.errors import ModelError
from smcli.scoring import score_bag
from tests.conftest import PATCH, torchmil_adjacency, tricky_coords

IN_DIM = 20


def train_like(model, coef=2.3):
    """Give a fresh torchmil model a non-default Sm coefficient, as training would."""
    state = model.state_dict()
    for key in state:
        if key.endswith("sm.sm.coef"):
            state[key] = torch.tensor(coef)
    model.load_state_dict(state)
    return model.eval()


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
    torch.manual_seed(0)
    if head:
        oracle = TorchmilSmABMIL(
            (IN_DIM,),
            att_dim=6,
            att_act=act,
            sm_mode=mode,
            sm_alpha=alpha,
            sm_where=where,
            spectral_norm=spectral,
        )
    else:
        oracle = TorchmilPool(IN_DIM, 6, act, mode, alpha, 10, where, spectral)
    train_like(oracle)
    pt = tmp_path / "model.pt"
    torch.save(oracle.state_dict(), pt)
    out = tmp_path / "model.safetensors"
    convert(
        pt,
        out,
        ConvertOptions(
            act=act, sm_mode=mode, sm_alpha=None if alpha == "trainable" else alpha, sm_where=where
        ),
    )
    model = load_model(out)
    # torchmil wraps no layer for 'late', so there the flag leaves no trace (and changes nothing)
    assert model.config.head is head
    assert model.config.pool.spectral_norm is (spectral and where != "late")

    coords = tricky_coords(2)
    features = torch.randn(len(coords), IN_DIM)
    bag = load_bag(bag_file("b", features, coords, patch_size=PATCH))
    result = score_bag(model, bag)
    adj = torchmil_adjacency(coords, PATCH)
    with torch.no_grad():
        out_t = oracle(features[None], (adj.to_dense() if mode == "exact" else adj)[None], return_att=True)
    logits = out_t[1][0].numpy()
    assert np.abs(result.table["attention_logit"].to_numpy() - logits).max() <= 1e-5
    if head:
        assert abs(result.summary.logit - float(out_t[0][0])) <= 1e-5
        assert result.summary.probability == pytest.approx(float(torch.sigmoid(out_t[0][0])), abs=1e-6)


def save_pool(tmp_path, **kwargs):
    torch.manual_seed(0)
    pool = TorchmilPool(IN_DIM, 6, **kwargs)
    path = tmp_path / "pool.pt"
    torch.save(pool.state_dict(), path)
    return path


@pytest.mark.parametrize(
    "kwargs,options,message",
    [
        ({}, ConvertOptions(sm_alpha=0.5), "contradicts the tensors: sm.sm.coef is present"),
        ({"sm_alpha": 0.5}, ConvertOptions(), "no sm.sm.coef tensor"),
        (
            {"spectral_norm": True},
            ConvertOptions(sm_alpha=None, sm_where="late"),
            "do not fit --sm-where late",
        ),
        ({"spectral_norm": True, "sm_where": "mid"}, ConvertOptions(sm_where="early"), "on proj2 only"),
        ({}, ConvertOptions(act="sigmoid"), "act must be one of"),
    ],
)
def test_convert_refuses_flags_that_contradict_the_tensors(tmp_path, kwargs, options, message):
    with pytest.raises(ModelError, match=message):
        convert(save_pool(tmp_path, **kwargs), tmp_path / "out.safetensors", options)
    assert not (tmp_path / "out.safetensors").exists()


def test_convert_refuses_foreign_tensors(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(ModelError, match="no proj1 weight"):
        convert(path, tmp_path / "out.safetensors", ConvertOptions())


def test_convert_act_default_follows_the_torchmil_class(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "abmil.pt"
    torch.save(TorchmilSmABMIL((IN_DIM,)).state_dict(), path)
    result = convert(path, tmp_path / "a.safetensors", ConvertOptions())
    assert result.config.pool.act == "tanh"  # SmABMIL's att_act default
    result = convert(save_pool(tmp_path), tmp_path / "p.safetensors", ConvertOptions())
    assert result.config.pool.act == "gelu"  # SmAttentionPool's act default


class _CreatesFile:
    """Unpickling this object would create a file: the attack weights_only must stop."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_convert_never_runs_a_malicious_pickle(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"proj1.weight": _CreatesFile(str(target))}, handle)
    with pytest.raises(ModelError, match="refused to load"):
        convert(path, tmp_path / "out.safetensors", ConvertOptions())
    assert not target.exists()


def write_checkpoint(path, tensors, metadata):
    save_file(tensors, str(path), metadata=metadata)
    return path


def pool_tensors():
    torch.manual_seed(0)
    return {k: v.contiguous() for k, v in TorchmilPool(IN_DIM, 6).state_dict().items()}


def config_json(**pool):
    base = {"in_dim": IN_DIM, "att_dim": 6}
    base.update(pool)
    return json.dumps({"pool": base, "head": False, "graph": {"patch_size": None, "dist_thr": 1.5}})


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: p.write_bytes(b"\x80\x02not a safetensors file at all"), "not a safetensors checkpoint"),
        (lambda p: write_checkpoint(p, pool_tensors(), {}), "no 'smcli_config' metadata"),
        (lambda p: write_checkpoint(p, pool_tensors(), {CONFIG_KEY: "{nope"}), "not valid JSON"),
        (
            lambda p: write_checkpoint(p, pool_tensors(), {CONFIG_KEY: json.dumps({"head": False})}),
            "lacks 'pool'",
        ),
        (
            lambda p: write_checkpoint(p, pool_tensors(), {CONFIG_KEY: config_json(sm_where="everywhere")}),
            "sm_where must be one of",
        ),
        (
            lambda p: write_checkpoint(p, pool_tensors(), {CONFIG_KEY: config_json(sm_alpha=1.0)}),
            r"sm_alpha must be 'trainable' or a number in \[0, 1\)",
        ),
        (
            lambda p: write_checkpoint(p, pool_tensors(), {CONFIG_KEY: config_json(in_dim=21)}),
            "tensors do not fit the config: .*proj1.weight has shape",
        ),
        (
            lambda p: write_checkpoint(p, pool_tensors(), {CONFIG_KEY: config_json(sm_alpha=0.3)}),
            "tensors do not fit the config: unexpected sm.sm.coef",
        ),
    ],
)
def test_load_model_errors_name_the_file_and_the_problem(tmp_path, make, message):
    path = tmp_path / "model.safetensors"
    make(path)
    with pytest.raises(ModelError, match=message) as err:
        load_model(path)
    assert str(err.value).startswith(str(path))
    assert "\n" not in str(err.value)


def test_load_model_missing_file(tmp_path):
    with pytest.raises(ModelError, match="no such model file"):
        load_model(tmp_path / "absent.safetensors")
