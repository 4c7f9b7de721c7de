"""Checkpoints: refuse unsafe or inconsistent ones, load safely (convert: tests/test_convert.py)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torchmil")
import torch
from safetensors.torch import save_file
from torchmil.nn import SmAttentionPool as TorchmilPool

from smcli.checkpoint import CONFIG_KEY, load_model
from smcli.errors import ModelError

IN_DIM = 20


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


def graph_json(**graph):
    document = json.loads(config_json())
    document["graph"].update(graph)
    return json.dumps(document)


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
            lambda p: write_checkpoint(p, pool_tensors(), {CONFIG_KEY: graph_json(weights="gaussian")}),
            "weights must be one of binary, feature_distance",
        ),
        (
            lambda p: write_checkpoint(p, pool_tensors(), {CONFIG_KEY: graph_json(origin="max")}),
            "origin must be one of min, zero",
        ),
        (
            lambda p: write_checkpoint(p, pool_tensors(), {CONFIG_KEY: graph_json(normalize="no")}),
            "normalize must be true or false",
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
