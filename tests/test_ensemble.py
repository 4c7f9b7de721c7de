"""Ensembles (`score -m A -m B [--ensemble mean|max]`, smcli.ensemble): each model's columns equal
its single-model run's, the combination, names, mismatches, and --skip-existing on the model list."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from smcli.checkpoint import ModelConfig, PoolConfig, build_module, save_checkpoint
from smcli.cli import app
from smcli.ensemble import load_ensemble, model_names
from smcli.errors import UsageError
from smcli.scoring import score_bag

ROOT = Path(__file__).resolve().parent.parent
SM_ABMIL = ROOT / "sample_bags/models/sm_abmil.safetensors"
ABMIL = ROOT / "sample_bags/models/abmil.safetensors"
BAGS = [ROOT / f"sample_bags/slide_0{i}.safetensors" for i in (1, 2, 3)]  # two with lesions

runner = CliRunner()


def score(*args):
    result = runner.invoke(app, ["score", *map(str, args), "--device", "cpu", "-q"])
    return result


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each model alone, and the two as mean and max ensembles, on three sample bags."""
    root = tmp_path_factory.mktemp("ensemble")
    for name, models in (
        ("sm_abmil", [SM_ABMIL]),
        ("abmil", [ABMIL]),
        ("mean", [SM_ABMIL, ABMIL]),
        ("max", [SM_ABMIL, ABMIL, "--ensemble", "max"]),
    ):
        args = [*BAGS, "-o", root / name]
        for model in models:
            args += ["-m", model] if isinstance(model, Path) else [model]
        result = score(*args)
        assert result.exit_code == 0, result.stderr
    return root


def test_each_models_columns_equal_its_single_run_exactly(runs):
    for combine in ("mean", "max"):
        for bag in ("slide_01", "slide_02", "slide_03"):
            ensemble = (runs / combine / f"{bag}.csv").read_text().splitlines()
            header = ensemble[0].split(",")
            assert header == [
                "bag_id",
                "instance",
                "x",
                "y",
                "attention_logit",
                "attention_weight",
                "attention_logit_sm_abmil",
                "attention_weight_sm_abmil",
                "attention_logit_abmil",
                "attention_weight_abmil",
                "label",
            ]
            cells = [line.split(",") for line in ensemble[1:]]
            for name in ("sm_abmil", "abmil"):
                alone = [
                    line.split(",") for line in (runs / name / f"{bag}.csv").read_text().splitlines()[1:]
                ]
                for column in ("attention_logit", "attention_weight"):
                    mine = header.index(f"{column}_{name}")
                    theirs = ["bag_id", "instance", "x", "y", "attention_logit", "attention_weight"].index(
                        column
                    )
                    assert [c[mine] for c in cells] == [
                        a[theirs] for a in alone
                    ]  # the same text, bit for bit


def test_the_combination(runs):
    for combine in ("mean", "max"):
        table = pd.read_csv(runs / combine / "slide_01.csv", dtype={"attention_weight": np.float32})
        weights = table[["attention_weight_sm_abmil", "attention_weight_abmil"]].to_numpy(np.float32)
        expected = weights.astype(np.float64).mean(axis=1) if combine == "mean" else weights.max(axis=1)
        assert np.array_equal(table["attention_weight"].to_numpy(np.float32), expected.astype(np.float32))
        logits = table[["attention_logit_sm_abmil", "attention_logit_abmil"]].to_numpy(np.float64)
        log_weights = logits - np.log(np.exp(logits).sum(axis=0))
        combined = np.log(np.exp(log_weights).mean(axis=1)) if combine == "mean" else log_weights.max(axis=1)
        assert np.allclose(table["attention_logit"], combined, rtol=0, atol=2e-5)
        # the combined logit ranks as the combined weight does
        assert np.corrcoef(table["attention_logit"].rank(), table["attention_weight"].rank())[0, 1] > 0.9999

        bags = {r["bag_id"]: r for r in rows(runs / combine / "_bags.csv")}
        singles = [
            {r["bag_id"]: r for r in rows(runs / name / "_bags.csv")} for name in ("sm_abmil", "abmil")
        ]
        for bag_id, record in bags.items():
            assert record["ensemble"] == combine and record["model_names"] == "sm_abmil;abmil"
            members = [float(s[bag_id]["probability"]) for s in singles]
            assert [float(p) for p in record["model_probabilities"].split(";")] == members
            expected_p = sum(members) / 2 if combine == "mean" else max(members)
            assert float(record["probability"]) == pytest.approx(expected_p, abs=1e-15)
            assert 1 / (1 + np.exp(-float(record["logit"]))) == pytest.approx(expected_p, abs=1e-12)
            assert record["model_sha256"] == ";".join(s[bag_id]["model_sha256"] for s in singles)
            assert record["model_aurocs"] == ";".join(s[bag_id]["auroc"] for s in singles)


def test_single_model_rows_have_no_ensemble_figures(runs):
    for record in rows(runs / "sm_abmil" / "_bags.csv"):
        assert record["ensemble"] == record["model_names"] == record["model_probabilities"] == ""


def test_names_from_stems_unique_by_position():
    assert model_names([Path("a/m.safetensors"), Path("b/n.safetensors")]) == ["m", "n"]
    assert model_names([Path("a/m.safetensors"), Path("b/m.safetensors"), Path("n.st")]) == [
        "m_1",
        "m_2",
        "n",
    ]
    assert model_names([Path("a;b.safetensors"), Path("c.safetensors")]) == ["model_1", "c"]
    with pytest.raises(UsageError, match="model names clash after numbering: m_1, m_2, m_2"):
        model_names([Path("x/m.safetensors"), Path("y/m.safetensors"), Path("m_2.safetensors")])


def test_clashing_stems_in_the_columns(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(SM_ABMIL, tmp_path / "a" / "model.safetensors")
    shutil.copy(ABMIL, tmp_path / "b" / "model.safetensors")
    result = score(BAGS[0], "-m", tmp_path / "a/model.safetensors", "-m", tmp_path / "b/model.safetensors")
    assert result.exit_code == 0, result.stderr
    header = result.stdout.splitlines()[0].split(",")
    assert header[6:10] == [
        "attention_logit_model_1",
        "attention_weight_model_1",
        "attention_logit_model_2",
        "attention_weight_model_2",
    ]


def write_model(path: Path, in_dim: int = 192, dist_thr: float = 2**0.5, seed: int = 0) -> Path:
    config = ModelConfig(PoolConfig(in_dim, 8), head=True, patch_size=512.0, dist_thr=dist_thr)
    save_checkpoint(build_module(config, seed).state_dict(), config, path)
    return path


def test_models_that_need_another_graph_or_features_are_refused(tmp_path):
    narrow = write_model(tmp_path / "narrow.safetensors", in_dim=12)
    wide = write_model(tmp_path / "wide.safetensors", dist_thr=2.0)
    for other, message in (
        (narrow, f"error: {narrow}: in_dim 12 differs from {SM_ABMIL}'s 192"),
        (wide, f"error: {wide}: dist_thr 2.0 differs from {SM_ABMIL}'s 1.4142135623730951"),
    ):
        result = score(BAGS[0], "-m", SM_ABMIL, "-m", other, "-o", tmp_path / "out")
        assert result.exit_code == 2
        assert result.stderr == message + ": an ensemble's models must share in_dim and the graph options\n"
    assert not (tmp_path / "out").exists()


def test_usage_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("SMCLI_MODEL", raising=False)
    cases = [
        (
            (BAGS[0], "-m", SM_ABMIL, "--ensemble", "mean"),
            "error: --ensemble needs two or more models (-m A -m B)\n",
        ),
        (
            (BAGS[0], "-m", SM_ABMIL, "-m", ABMIL, "--ensemble", "median"),
            "error: --ensemble must be mean or max, got 'median'\n",
        ),
        ((BAGS[0],), "error: no model: pass -m MODEL (or set SMCLI_MODEL)\n"),
    ]
    for args, message in cases:
        result = score(*args)
        assert (result.exit_code, result.stderr) == (2, message)


def test_skip_existing_compares_the_whole_model_list(tmp_path):
    out = tmp_path / "out"
    first = score(*BAGS, "-m", SM_ABMIL, "-m", ABMIL, "-o", out)
    assert first.exit_code == 0
    summary = runner.invoke(
        app,
        ["score", *map(str, BAGS), "-m", str(SM_ABMIL), "-m", str(ABMIL)]
        + ["-o", str(out), "--skip-existing", "--device", "cpu"],
    )
    assert summary.stderr.splitlines()[-1].startswith("smcli: 0 ok, 3 skipped, 0 failed")
    for models in ([ABMIL, SM_ABMIL], [SM_ABMIL], [SM_ABMIL, ABMIL, ABMIL]):
        args = [str(a) for m in models for a in ("-m", m)]
        again = runner.invoke(
            app, ["score", *map(str, BAGS), *args, "-o", str(out), "--skip-existing", "--device", "cpu"]
        )
        assert again.stderr.splitlines()[-1].startswith("smcli: 3 ok, 0 skipped, 0 failed"), models
    kept = rows(out / "_bags.csv")
    assert all(r["model_names"] == "sm_abmil;abmil_2;abmil_3" for r in kept)
    skipped = runner.invoke(
        app, ["score", *map(str, BAGS), *args, "-o", str(out), "--skip-existing", "--device", "cpu"]
    )
    assert skipped.stderr.splitlines()[-1].startswith("smcli: 0 ok, 3 skipped, 0 failed")
    record = rows(out / "_bags.csv")[0]
    assert record["status"] == "skipped" and record["model_names"] == "sm_abmil;abmil_2;abmil_3"
    assert len(record["model_probabilities"].split(";")) == 3


def test_api_ensemble_and_top_k(runs):
    from smcli.scoring import ScoreOptions

    ensemble = load_ensemble([SM_ABMIL, ABMIL])
    result = score_bag(ensemble, BAGS[0])
    table = pd.read_csv(runs / "mean" / "slide_01.csv")
    assert np.array_equal(
        result.table["attention_weight_abmil"].to_numpy(),
        table["attention_weight_abmil"].to_numpy(np.float32),
    )
    top = score_bag(ensemble, BAGS[0], ScoreOptions(top_k=5))
    assert list(top.table["instance"]) == list(
        result.table.sort_values("attention_logit", ascending=False, kind="stable")["instance"][:5]
    )
    assert result.summary.model_names == ["sm_abmil", "abmil"] and result.summary.ensemble == "mean"


def test_one_graph_per_bag_and_each_model_once(monkeypatch):
    import smcli.ensemble
    import smcli.scoring
    from smcli.scoring import score_bags

    built, ran = [], []
    build, run = smcli.scoring.build_adjacency_with, smcli.ensemble.run_model
    monkeypatch.setattr(
        smcli.scoring, "build_adjacency_with", lambda *a, **k: built.append(1) or build(*a, **k)
    )
    monkeypatch.setattr(smcli.ensemble, "run_model", lambda m, *a: ran.append(m.path.name) or run(m, *a))
    results = list(score_bags(BAGS, load_ensemble([SM_ABMIL, ABMIL, SM_ABMIL])))
    assert [r.summary.status for r in results] == ["ok"] * 3
    assert len(built) == 3
    assert ran == ["sm_abmil.safetensors", "abmil.safetensors", "sm_abmil.safetensors"] * 3
