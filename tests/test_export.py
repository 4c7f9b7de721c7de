"""export_torchmil: every setting read off a live torchmil model, scores equal to its forward."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

pytest.importorskip("torchmil")
import torch
from torchmil.models import SmABMIL as TorchmilSmABMIL
from torchmil.models import SmTransformerABMIL as TorchmilSmTransformerABMIL
from torchmil.nn import SmAttentionPool as TorchmilPool

import smcli
from smcli.bags import load_bag
from smcli.checkpoint import load_model
from smcli.errors import ModelError
from smcli.scoring import score_bag
from tests.conftest import PATCH, tricky_coords
from tests.oracle import make_torchmil_model, torchmil_adjacency

IN_DIM = 12


def make_model(head, mode, where, spectral, alpha, act, steps=10):
    return make_torchmil_model(IN_DIM, 5, head, mode, where, spectral, alpha, act, steps)


def train_steps(model, features, adj, steps=3):
    """A few real optimizer steps in train mode: weights, coef and spectral-norm u, v all move."""
    for name, parameter in model.named_parameters():
        if name.endswith("sm.sm.coef"):
            with torch.no_grad():
                parameter.fill_(2.3)  # start away from torchmil's initial 1
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        first, attention = model(features[None], adj[None], return_att=True)
        loss = first.square().mean() + attention.square().mean()
        loss.backward()
        optimizer.step()
    return model


def torchmil_scores(model, features, adj, mode):
    model.eval()
    with torch.no_grad():
        first, attention = model(
            features[None], (adj.to_dense() if mode == "exact" else adj)[None], return_att=True
        )
    return first[0], attention[0].numpy()


EXPORT_CONFIGS = list(
    itertools.product(
        ["approx", "exact"],
        ["early", "mid", "late", "none"],
        [False, True],
        ["trainable", 0.6],
        ["tanh", "relu", "gelu"],
        [False, True],
    )
)


@pytest.mark.parametrize("mode,where,spectral,alpha,act,head", EXPORT_CONFIGS)
def test_exported_model_scores_like_torchmil(tmp_path, bag_file, mode, where, spectral, alpha, act, head):
    torch.manual_seed(len(tmp_path.name))
    coords = tricky_coords(3)
    features = torch.randn(len(coords), IN_DIM)
    adj = torchmil_adjacency(coords, PATCH)
    model = train_steps(make_model(head, mode, where, spectral, alpha, act), features, adj.to_dense())
    out = tmp_path / "model.safetensors"
    config = smcli.export_torchmil(model, out, patch_size=PATCH)  # still in train mode: u, v as stored
    reference_first, reference = torchmil_scores(model, features, adj, mode)

    assert (config.pool.sm_mode, config.pool.sm_where, config.pool.act) == (mode, where, act)
    assert config.pool.sm_alpha == alpha and config.head is head and config.assumed == ()
    loaded = load_model(out)
    result = score_bag(loaded, load_bag(bag_file("b", features, coords)))
    assert np.abs(result.table["attention_logit"].to_numpy() - reference).max() <= 1e-5
    if head:
        assert abs(result.summary.logit - float(reference_first)) <= 1e-5


@pytest.mark.parametrize("steps", [3, 20])  # (0 steps: torchmil's forward fails, Identity gets adj)
def test_export_reads_sm_steps(tmp_path, bag_file, steps):
    torch.manual_seed(1)
    coords = tricky_coords(4)
    features = torch.randn(len(coords), IN_DIM)
    adj = torchmil_adjacency(coords, PATCH)
    model = train_steps(
        make_model(False, "approx", "mid", False, "trainable", "gelu", steps), features, adj.to_dense()
    )
    config = smcli.export_torchmil(model, tmp_path / "m.safetensors", patch_size=PATCH)
    assert config.pool.sm_steps == steps
    _, reference = torchmil_scores(model, features, adj, "approx")
    result = score_bag(load_model(tmp_path / "m.safetensors"), load_bag(bag_file("b", features, coords)))
    assert np.abs(result.table["attention_logit"].to_numpy() - reference).max() <= 1e-5


def test_export_refuses_a_feature_extractor_naming_its_tensors(tmp_path):
    extractor = torch.nn.Sequential(torch.nn.Linear(7, IN_DIM))
    model = TorchmilSmABMIL((7,), att_dim=5, feat_ext=extractor)
    with pytest.raises(ModelError, match=r"feature extractor \(feat_ext.0.weight, feat_ext.0.bias\)"):
        smcli.export_torchmil(model, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize(
    "model,message",
    [
        (torch.nn.Linear(3, 1), "is not a torchmil SmAttentionPool or SmABMIL"),
        (TorchmilPool(IN_DIM, 5, sm_alpha=1.5), r"sm_alpha must be 'trainable' or a number in \[0, 1\)"),
    ],
)
def test_export_refuses_what_it_cannot_reproduce(tmp_path, model, message):
    with pytest.raises(ModelError, match=message):
        smcli.export_torchmil(model, tmp_path / "m.safetensors")


def test_export_refuses_a_hand_made_spectral_norm_layout(tmp_path):
    model = TorchmilPool(IN_DIM, 5, sm_where="late")
    model.proj1 = torch.nn.utils.parametrizations.spectral_norm(model.proj1)
    with pytest.raises(
        ModelError, match="spectral norm on proj1 is not what torchmil builds for sm_where late"
    ):
        smcli.export_torchmil(model, tmp_path / "m.safetensors")


class _SubclassedPool(TorchmilPool):
    """A user subclass: same tensors, but its forward could be anything."""


def _with_extra_child() -> torch.nn.Module:
    model = TorchmilSmABMIL((IN_DIM,), att_dim=5)
    model.extra = torch.nn.Linear(2, 2)
    return model


def _transformer_with_extra_child() -> torch.nn.Module:
    model = TorchmilSmTransformerABMIL((IN_DIM,), transf_att_dim=8, transf_n_heads=2)
    model.transformer_encoder.extra = torch.nn.Linear(2, 2)
    return model


def _with_hook() -> torch.nn.Module:
    model = TorchmilPool(IN_DIM, 5)
    model.proj1.register_forward_hook(lambda module, inputs, output: output * 2)
    return model


def _with_hidden_buffer() -> torch.nn.Module:
    model = TorchmilSmABMIL((IN_DIM,), att_dim=5)
    model.pool.register_buffer("scale", torch.ones(1), persistent=False)
    return model


def _with_parameterless_extractor() -> torch.nn.Module:
    model = TorchmilSmABMIL((IN_DIM,), att_dim=5)
    model.feat_ext = torch.nn.ReLU()
    return model


@pytest.mark.parametrize(
    "build,message",
    [
        (
            _transformer_with_extra_child,
            r"^export_torchmil: the model has a part smcli does not know: transformer_encoder\.extra "
            r"\(Linear, 2 tensors\); exporting without it would score a different model$",
        ),
        (_with_extra_child, r"a part smcli does not know: extra \(Linear, 2 tensors\)"),
        (lambda: _SubclassedPool(IN_DIM, 5), r"the model is tests\.test_export\._SubclassedPool: smcli "),
        (_with_parameterless_extractor, r"feat_ext is torch\.nn\.modules\.activation\.ReLU: smcli repro"),
        (_with_hook, r"^export_torchmil: proj1 has forward hooks: smcli cannot know what they change$"),
        (_with_hidden_buffer, r"tensors smcli does not rebuild \(pool\.scale\)"),
    ],
)
def test_export_refuses_any_part_it_does_not_know(tmp_path, build, message):
    """A whitelist: what export does not fully understand is refused, never dropped (issue 19)."""
    with pytest.raises(ModelError, match=message) as caught:
        smcli.export_torchmil(build(), tmp_path / "m.safetensors")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "m.safetensors").exists()


def test_export_ignores_the_training_loss(tmp_path):
    model = TorchmilSmABMIL(
        (IN_DIM,), att_dim=5, criterion=torch.nn.BCEWithLogitsLoss(pos_weight=torch.ones(1))
    )
    assert smcli.export_torchmil(model, tmp_path / "m.safetensors").head


def test_export_is_lazy_in_the_api():
    assert "export_torchmil" in smcli.__all__
    assert smcli.export_torchmil.__module__ == "smcli.export"
