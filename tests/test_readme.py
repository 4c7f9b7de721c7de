"""The README's promises, checked: the API example runs, the quickstart's table is what it prints."""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from smcli.cli import app

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"## {title}")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


def test_python_api_example_runs(monkeypatch):
    code = re.search(r"```python\n(.*?)```", section("Python API"), re.S).group(1)
    monkeypatch.chdir(ROOT)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {})
    assert "attention_logit" in printed.getvalue()
    assert "slide_02 ok" in printed.getvalue()


TABLE_MODELS = ("sm_transformer_abmil", "sm_abmil", "abmil")  # the AUROC columns, in order


def readme_auroc_table() -> dict[str, tuple[float, ...]]:
    rows = re.findall(r"^\| (slide_\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", section("Quickstart"), re.M)
    return {bag: tuple(float(value) for value in values) for bag, *values in rows}


@pytest.mark.slow
def test_quickstart_reproduces_the_readme_auroc_table(tmp_path):
    runner = CliRunner()
    command = re.search(r"```\n(smcli score sample_bags/ .*?)\n```", section("Quickstart")).group(1)
    assert command == "smcli score sample_bags/ -m sample_bags/models/sm_abmil.safetensors -o scores/"
    aurocs = {}
    for name in TABLE_MODELS:
        out = tmp_path / name
        args = [
            "score",
            str(ROOT / "sample_bags"),
            "-m",
            str(ROOT / f"sample_bags/models/{name}.safetensors"),
        ]
        result = runner.invoke(app, [*args, "-o", str(out), "--device", "cpu"])
        assert result.exit_code == 0, result.stderr
        aurocs[name] = pd.read_csv(out / "_bags.csv").set_index("bag_id")["auroc"].dropna()
    table = readme_auroc_table()
    assert set(table) == set(aurocs["sm_abmil"].index)
    for bag, values in table.items():
        assert tuple(round(aurocs[name][bag], 3) for name in TABLE_MODELS) == values
    pattern = r"\*\*mean\*\* \| \*\*([\d.]+)\*\* \| \*\*([\d.]+)\*\* \| \*\*([\d.]+)\*\*"
    mean = re.search(pattern, section("Quickstart")).groups()
    assert tuple(round(aurocs[name].mean(), 3) for name in TABLE_MODELS) == tuple(map(float, mean))


def test_readme_test_command_is_what_ci_runs():
    command = re.search(r"```\n(.*?)\n```", section("Tests")).group(1)
    assert command in (ROOT / ".ci" / "run").read_text()
    assert os.access(ROOT / ".ci" / "run", os.R_OK)


def test_bring_your_model_config_and_note_are_what_convert_takes_and_prints(tmp_path):
    import json

    pytest.importorskip("torchmil")
    import torch
    from torchmil.models import SmABMIL

    text = section("Bring your model")
    config = tmp_path / "train.json"
    config.write_text(re.search(r"```json\n(.*?)```", text, re.S).group(1))
    torch.manual_seed(0)
    pt = tmp_path / "model.pt"
    torch.save(SmABMIL((8,), spectral_norm=True).state_dict(), pt)
    runner = CliRunner()
    strict = runner.invoke(
        app, ["convert", str(pt), "-o", str(tmp_path / "a.safetensors"), "--config", str(config), "--strict"]
    )
    assert strict.exit_code == 0, strict.stderr
    assert json.loads(config.read_text())["att_act"] == "tanh"
    bare = tmp_path / "bare.pt"
    torch.save(SmABMIL((8,)).state_dict(), bare)
    plain = runner.invoke(app, ["convert", str(bare), "-o", str(tmp_path / "b.safetensors")])
    note = re.search(r"```\n(note: .*?)\n```", text).group(1)
    assert plain.stderr.splitlines()[0] == note.replace("model.pt", str(bare))
