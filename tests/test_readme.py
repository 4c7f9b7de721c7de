"""The README's promises, checked: the API example runs, the quickstart's table is what it prints."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
from pathlib import Path

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


EVALUATE_OUTPUT = re.compile(
    r"<!-- smcli evaluate output: [^>]*-->\n(.*?)<!-- end of smcli evaluate output -->", re.S
)


@pytest.mark.slow
def test_quickstart_evaluation_tables_are_what_smcli_evaluate_prints(tmp_path, monkeypatch):
    """The README's model table is `smcli evaluate`'s output: run the commands above it, verbatim
    (in a scratch directory that sees sample_bags/), and compare every byte."""
    quickstart = section("Quickstart")
    block = quickstart[: EVALUATE_OUTPUT.search(quickstart).start()]
    commands = re.findall(r"```\n((?:smcli [^\n]*\n)+)```", block)[-1].splitlines()
    assert commands[-1].startswith("smcli evaluate ")
    (tmp_path / "sample_bags").symlink_to(ROOT / "sample_bags")
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for command in commands:
        args = shlex.split(command)[1:]
        if args[0] == "score":
            args += ["--device", "cpu", "--quiet"]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (command, result.stderr)
    assert result.stdout == EVALUATE_OUTPUT.search(quickstart).group(1)


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
    refused = runner.invoke(app, ["convert", str(bare), "-o", str(tmp_path / "b.safetensors")])
    error = re.search(r"```\n(error: .*?)\n```", text).group(1)
    assert refused.exit_code == 2 and refused.stderr.splitlines() == [error.replace("model.pt", str(bare))]
    plain = runner.invoke(
        app, ["convert", str(bare), "-o", str(tmp_path / "b.safetensors"), "--assume-defaults"]
    )
    note = re.search(r"```\n(note: .*?)\n```", text).group(1)
    assert plain.stderr.splitlines()[0] == note.replace("model.pt", str(bare))
