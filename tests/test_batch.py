"""Batch safety of `smcli score`, through the real CLI: resume/overwrite, atomic writes, interrupts,
failure isolation, bad inputs, safe model files, scripting (stdin, shards) and progress output.

In-process through one CliRunner, except the interrupt tests that need a real process to signal.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import re
import shlex
import signal
import struct
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

pytest.importorskip("torchmil")
import torch
from safetensors.torch import save, save_file
from torchmil.nn import SmAttentionPool as TorchmilPool
from typer.testing import CliRunner

import smcli.writers
from smcli.checkpoint import ModelConfig, PoolConfig, save_checkpoint
from smcli.cli import app
from tests.conftest import PATCH

IN_DIM = 8
ATT_DIM = 4
STDERR_PREFIXES = ("smcli: ", "error: ", "warning: ", "note: ")

runner = CliRunner()


def invoke(*args, input=None, env=None):
    """Run the CLI in-process. An exception escaping smcli (a traceback in a real shell) fails the test."""
    result = runner.invoke(app, [str(a) for a in args], input=input, env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        trace = "".join(traceback.format_exception(*result.exc_info)).splitlines()
        trace = "\n".join(trace[:1] + ["  ..."] + trace[-7:])
        pytest.fail(f"smcli crashed (a shell would print a Traceback):\n{trace}\nstderr: {result.stderr}")
    return result


# ----------------------------------------------------------------------------------------- helpers


def grid(rows: int = 5, cols: int = 4, step: float = PATCH) -> np.ndarray:
    return np.ascontiguousarray(np.argwhere(np.ones((rows, cols))).astype(np.int64) * int(step))


def random_features(n: int, dim: int = IN_DIM, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def write_tensors(path: Path, tensors: dict, **metadata) -> Path:
    """A bag with arbitrary tensors (any names, dtypes, shapes), written by safetensors itself."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={k: str(v) for k, v in metadata.items()} or None)
    return path


def good_tensors(n_rows: int = 5, n_cols: int = 4, seed: int = 0) -> dict:
    coords = grid(n_rows, n_cols)
    return {"features": random_features(len(coords), seed=seed), "coords": torch.from_numpy(coords)}


def bags_rows(path: Path) -> dict[str, dict[str, str]]:
    """`_bags.csv` as {bag_id: row}, every cell a string ('' when empty)."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert frame["bag_id"].is_unique, frame
    return {row["bag_id"]: row for row in frame.to_dict("records")}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def tmp_leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*") if p.name.endswith(".tmp"))


def file_state(path: Path) -> tuple:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, path.read_bytes()


def assert_clean_stderr(stderr: str) -> None:
    """Non-tty stderr: no progress-bar escape codes, every line one of smcli's one-line kinds."""
    assert "Traceback" not in stderr
    assert "\x1b[" not in stderr and "\r" not in stderr
    for line in stderr.splitlines():
        assert line.startswith(STDERR_PREFIXES), repr(line)


# ---------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def model_file(tmp_path):
    torch.manual_seed(0)
    pool = TorchmilPool(IN_DIM, ATT_DIM)
    state = pool.state_dict()
    state["sm.sm.coef"] = torch.tensor(1.3)
    path = tmp_path / "models" / "pool.safetensors"
    path.parent.mkdir()
    save_checkpoint(state, ModelConfig(PoolConfig(IN_DIM, ATT_DIM)), path)
    return path


@pytest.fixture
def make_bag(bag_file):
    """make_bag(directory, name, rows, cols, seed, **metadata): a small grid bag moved into directory."""

    def make(directory: Path, name: str, rows: int = 5, cols: int = 4, seed: int = 0, **metadata):
        coords = grid(rows, cols)
        metadata.setdefault("patch_size", PATCH)
        path = bag_file(name, random_features(len(coords), seed=seed), coords, **metadata)
        directory.mkdir(parents=True, exist_ok=True)
        return path.rename(directory / path.name)

    return make


@pytest.fixture
def three_bags(tmp_path, make_bag):
    """tmp_path/bags with slide_a, slide_b, slide_c (different sizes, so different figures)."""
    directory = tmp_path / "bags"
    for seed, (name, rows) in enumerate((("slide_a", 5), ("slide_b", 6), ("slide_c", 3))):
        make_bag(directory, name, rows=rows, cols=4, seed=seed)
    return directory


# ------------------------------------------------------------------ 1. resume and overwrite


def test_existing_output_fails_the_bag_and_names_both_flags(tmp_path, three_bags, model_file):
    out = tmp_path / "out"
    assert invoke("score", three_bags, "-m", model_file, "-o", out).exit_code == 0
    before = {p.name: file_state(p) for p in out.glob("slide_*.csv")}
    earlier = bags_rows(out / "_bags.csv")

    result = invoke("score", three_bags, "-m", model_file, "-o", out)
    assert result.exit_code == 1
    errors = error_lines(result.stderr)
    assert len(errors) == 3
    for name, line in zip(("slide_a", "slide_b", "slide_c"), errors, strict=True):
        assert str(out / f"{name}.csv") in line
        assert "--skip-existing" in line and "--overwrite" in line
    assert {p.name: file_state(p) for p in out.glob("slide_*.csv")} == before  # untouched
    assert bags_rows(out / "_bags.csv") == earlier  # and so are the rows that describe them
    assert "0 ok, 0 skipped, 3 failed" in result.stderr.splitlines()[-1]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_skip_existing_keeps_complete_files_and_rescores_incomplete_ones(
    tmp_path, three_bags, model_file, fmt
):
    out = tmp_path / "out"
    first = invoke("score", three_bags, "-m", model_file, "-o", out, "--format", fmt)
    assert first.exit_code == 0, first.stderr
    earlier = bags_rows(out / "_bags.csv")
    fresh = {name: (out / f"{name}.{fmt}").read_bytes() for name in earlier}
    kept = {name: file_state(out / f"{name}.{fmt}") for name in ("slide_a", "slide_c")}
    # slide_b's file is left incomplete, as a crash of a non-atomic writer would leave it
    broken = out / f"slide_b.{fmt}"
    if fmt == "csv":
        text = fresh["slide_b"]
        broken.write_bytes(text[: text.rindex(b"\n", 0, len(text) - 1) + 7])  # cut inside a row
        assert not broken.read_bytes().endswith(b"\n")
    else:
        broken.write_bytes(fresh["slide_b"][: len(fresh["slide_b"]) // 2])

    result = invoke("score", three_bags, "-m", model_file, "-o", out, "--format", fmt, "--skip-existing")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.splitlines()[-1].startswith("smcli: 1 ok, 2 skipped, 0 failed")
    rows = bags_rows(out / "_bags.csv")
    assert {k: r["status"] for k, r in rows.items()} == {
        "slide_a": "skipped",
        "slide_b": "ok",
        "slide_c": "skipped",
    }
    for name in ("slide_a", "slide_c"):
        assert file_state(out / f"{name}.{fmt}") == kept[name]  # not rewritten
        for column in ("n_instances", "n_edges", "patch_step", "dist_thr"):
            assert float(rows[name][column]) == float(earlier[name][column]), (name, column)
        assert rows[name]["patch_step_source"] == earlier[name]["patch_step_source"]
    assert broken.read_bytes() == fresh["slide_b"]
    assert float(rows["slide_b"]["n_instances"]) == 24
    assert tmp_leftovers(out) == []


def test_skip_existing_rescores_a_csv_without_smcli_header(tmp_path, three_bags, model_file):
    out = tmp_path / "out"
    assert invoke("score", three_bags, "-m", model_file, "-o", out).exit_code == 0
    fresh = (out / "slide_a.csv").read_bytes()
    (out / "slide_a.csv").write_bytes(b"something else\n")
    result = invoke("score", three_bags, "-m", model_file, "-o", out, "--skip-existing")
    assert result.exit_code == 0, result.stderr
    assert bags_rows(out / "_bags.csv")["slide_a"]["status"] == "ok"
    assert (out / "slide_a.csv").read_bytes() == fresh


def test_overwrite_replaces_existing_files(tmp_path, three_bags, model_file):
    out = tmp_path / "out"
    assert invoke("score", three_bags, "-m", model_file, "-o", out).exit_code == 0
    fresh = {p.name: p.read_bytes() for p in out.glob("slide_*.csv")}
    for name in fresh:
        (out / name).write_text("bag_id,instance,stale\n")
    result = invoke("score", three_bags, "-m", model_file, "-o", out, "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert {p.name: p.read_bytes() for p in out.glob("slide_*.csv")} == fresh
    assert {r["status"] for r in bags_rows(out / "_bags.csv").values()} == {"ok"}
    assert "3 ok, 0 skipped, 0 failed" in result.stderr


def test_skip_existing_and_overwrite_together_exit_2(tmp_path, three_bags, model_file):
    out = tmp_path / "out"
    result = invoke("score", three_bags, "-m", model_file, "-o", out, "--skip-existing", "--overwrite")
    assert result.exit_code == 2
    assert "--skip-existing and --overwrite" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_existing_single_table_needs_overwrite(tmp_path, three_bags, model_file, suffix):
    table = tmp_path / f"scores{suffix}"
    table.write_bytes(b"precious")
    for extra in ([], ["--skip-existing"]):
        result = invoke("score", three_bags, "-m", model_file, "-o", table, *extra)
        assert result.exit_code == 2, result.stderr
        assert "--overwrite" in result.stderr and str(table) in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert table.read_bytes() == b"precious"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bags", "models", table.name]

    result = invoke("score", three_bags, "-m", model_file, "-o", table, "--overwrite")
    assert result.exit_code == 0, result.stderr
    frame = pd.read_csv(table) if suffix == ".csv" else pd.read_parquet(table)
    assert frame["bag_id"].unique().tolist() == ["slide_a", "slide_b", "slide_c"]
    assert len(frame) == 20 + 24 + 12
    assert tmp_leftovers(tmp_path) == []


# -------------------------------------------------------------------- 2. nothing half-written


def _raise_enospc_for(monkeypatch, fmt: str, fragment: str) -> None:
    """Writing any file whose name contains `fragment` writes some bytes, then fails with ENOSPC."""
    if fmt == "csv":
        real = smcli.writers.write_csv

        def write_csv(table, handle, header):
            if fragment in str(getattr(handle, "name", "")):
                handle.write(b"bag_id,instance,x,y,attention_logit,attention_weight\n1,")
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(table, handle, header)

        monkeypatch.setattr(smcli.writers, "write_csv", write_csv)
    else:
        real_write = pq.write_table

        def write_table(table, where, *args, **kwargs):
            if fragment in os.fspath(where):
                Path(where).write_bytes(b"PAR1 half a parquet file")
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(table, where, *args, **kwargs)

        monkeypatch.setattr(pq, "write_table", write_table)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_failed_write_leaves_no_temporary_file_and_fails_that_bag_only(
    tmp_path, three_bags, model_file, monkeypatch, fmt
):
    out = tmp_path / "out"
    _raise_enospc_for(monkeypatch, fmt, "slide_b")
    result = invoke("score", three_bags, "-m", model_file, "-o", out, "--format", fmt)
    assert result.exit_code == 1
    errors = error_lines(result.stderr)
    assert len(errors) == 1, result.stderr
    assert str(out / f"slide_b.{fmt}") in errors[0] and "No space left on device" in errors[0]
    assert "Traceback" not in result.stderr
    assert tmp_leftovers(out) == []
    listed = sorted(p.name for p in out.iterdir() if p.name[0] != ".")
    assert listed == ["_bags.csv", f"slide_a.{fmt}", f"slide_c.{fmt}"]
    rows = bags_rows(out / "_bags.csv")
    assert {k: r["status"] for k, r in rows.items()} == {"slide_a": "ok", "slide_b": "error", "slide_c": "ok"}
    assert "No space left on device" in rows["slide_b"]["error"]
    assert result.stderr.splitlines()[-1].startswith("smcli: 2 ok, 0 skipped, 1 failed")


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_failed_write_of_a_single_table_leaves_nothing(
    tmp_path, three_bags, model_file, monkeypatch, suffix
):
    table = tmp_path / "out" / f"scores{suffix}"
    table.parent.mkdir()
    if suffix == ".csv":
        real = smcli.writers.write_csv
        calls = []

        def write_csv(rows, handle, header):
            if str(getattr(handle, "name", "")).endswith(".tmp"):
                calls.append(handle.name)
                if len(calls) == 2:  # the second bag's rows
                    raise OSError(errno.ENOSPC, "No space left on device")
            return real(rows, handle, header)

        monkeypatch.setattr(smcli.writers, "write_csv", write_csv)
    else:
        import pyarrow.parquet

        real_writer = pyarrow.parquet.ParquetWriter

        class FailingWriter(real_writer):
            def write_table(self, table, *args, **kwargs):
                if getattr(self, "_written", False):
                    raise OSError(errno.ENOSPC, "No space left on device")
                self._written = True
                return super().write_table(table, *args, **kwargs)

        monkeypatch.setattr(pyarrow.parquet, "ParquetWriter", FailingWriter)
    result = invoke("score", three_bags, "-m", model_file, "-o", table)
    assert result.exit_code == 1
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and str(table) in errors[0] and "No space left on device" in errors[0]
    assert "Traceback" not in result.stderr
    assert list(table.parent.iterdir()) == []  # no table, no bags file, no temporary file


def test_bags_file_is_rewritten_after_every_bag(tmp_path, three_bags, model_file, monkeypatch):
    (three_bags / "slide_b.safetensors").write_bytes(b"not a bag at all")
    out = tmp_path / "out"
    snapshots = []
    real = smcli.writers.write_bags_csv

    def spy(rows, path, *args, **kwargs):
        real(rows, path, *args, **kwargs)
        snapshots.append({k: r["status"] for k, r in bags_rows(Path(path)).items()})

    monkeypatch.setattr(smcli.writers, "write_bags_csv", spy)
    result = invoke("score", three_bags, "-m", model_file, "-o", out)
    assert result.exit_code == 1
    assert snapshots == [
        {"slide_a": "ok"},
        {"slide_a": "ok", "slide_b": "error"},
        {"slide_a": "ok", "slide_b": "error", "slide_c": "ok"},
    ]
    rows = bags_rows(out / "_bags.csv")
    for bag_id, row in rows.items():
        assert (out / f"{bag_id}.csv").exists() == (row["status"] == "ok")
    assert str(three_bags / "slide_b.safetensors") in rows["slide_b"]["error"]
    assert float(rows["slide_a"]["n_instances"]) == 20 and float(rows["slide_c"]["n_instances"]) == 12


def test_count_columns_stay_integers_when_a_bag_fails(tmp_path, three_bags, model_file):
    """n_instances / n_edges are counts: '20', not '20.0', even when a failed row leaves them empty."""
    (three_bags / "slide_b.safetensors").write_bytes(b"not a bag at all")
    out = tmp_path / "out"
    assert invoke("score", three_bags, "-m", model_file, "-o", out).exit_code == 1
    rows = bags_rows(out / "_bags.csv")
    assert rows["slide_b"]["n_instances"] == "" and rows["slide_b"]["n_edges"] == ""
    assert rows["slide_a"]["n_instances"] == "20" and rows["slide_c"]["n_instances"] == "12"
    assert rows["slide_a"]["n_edges"].isdigit() and rows["slide_c"]["n_edges"].isdigit()


# ------------------------------------------------------------------------------ 3. interrupts


INTERRUPT_BAGS = 30
INTERRUPT_STEPS = 800  # many cheap approx Sm steps: each bag takes tens of ms, files stay small


@pytest.fixture(scope="module")
def slow_run_inputs(tmp_path_factory):
    """30 bags of 1000 patches x 64 features and a model slow enough that a run lasts about a second."""
    root = tmp_path_factory.mktemp("interrupts")
    bags = root / "bags"
    bags.mkdir()
    coords = torch.from_numpy(grid(40, 25))
    for i in range(INTERRUPT_BAGS):
        features = random_features(len(coords), dim=64, seed=100 + i)
        write_tensors(
            bags / f"bag_{i:02d}.safetensors", {"features": features, "coords": coords}, patch_size=PATCH
        )
    torch.manual_seed(1)
    model = root / "slow.safetensors"
    config = ModelConfig(PoolConfig(64, 16, sm_steps=INTERRUPT_STEPS))
    save_checkpoint(TorchmilPool(64, 16).state_dict(), config, model)
    return bags, model


def _smcli(bags: Path, model: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "smcli", "score", str(bags), "-m", str(model), "-o", str(out), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=out.parent,
    )


def _bag_files(out: Path) -> dict[str, bytes]:
    return {p.stem: p.read_bytes() for p in out.glob("bag_*.csv")}


def _signal_when_files_exist(procs: dict, at_least: int = 3, deadline_s: float = 60.0) -> None:
    """Send each process its signal once `at_least` of its per-bag files are in place."""
    pending = dict(procs)
    deadline = time.monotonic() + deadline_s
    while pending and time.monotonic() < deadline:
        for out, (proc, sig) in list(pending.items()):
            if proc.poll() is not None:
                pytest.fail(f"smcli finished before it could be interrupted: {proc.stderr.read()}")
            if out.is_dir() and len(list(out.glob("bag_*.csv"))) >= at_least:
                proc.send_signal(sig)
                del pending[out]
        time.sleep(0.005)
    assert not pending, "no output appeared in time"


def test_interrupt_leaves_complete_files_a_truthful_bags_file_and_resumes(tmp_path, slow_run_inputs):
    bags, model = slow_run_inputs
    runs = {
        signal.SIGINT: (tmp_path / "sigint", 130, "SIGINT"),
        signal.SIGTERM: (tmp_path / "sigterm", 143, "SIGTERM"),
    }
    procs = {out: (_smcli(bags, model, out), sig) for sig, (out, _, _) in runs.items()}
    _signal_when_files_exist(procs)

    untruthful = []  # checked last, so that one failure does not hide the resume checks
    for out, (proc, sig) in procs.items():
        _, expected_code, name = runs[sig]
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == expected_code, stderr
        assert stdout == ""
        assert "Traceback" not in stderr
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("smcli: ") and f"interrupted by {name}" in last, stderr
        leftovers = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
        assert leftovers == []
        written = _bag_files(out)
        assert 3 <= len(written) < INTERRUPT_BAGS
        rows = bags_rows(out / "_bags.csv")
        assert {r["status"] for r in rows.values()} == {"ok"}
        truthful_summary = f"{len(written)} ok, 0 skipped, 0 failed; interrupted by {name}, "
        truthful_summary += f"{INTERRUPT_BAGS - len(written)} not done"
        if set(rows) != set(written) or truthful_summary not in last:
            untruthful.append(
                f"{name}: {len(written)} bag files in place, _bags.csv lists {len(rows)}, "
                f"summary {last!r}; files missing from _bags.csv: {sorted(set(written) - set(rows))}"
            )

    # the uninterrupted run, in a subprocess on one thread like the others (OMP_NUM_THREADS=1: the
    # BLAS fixes its thread count when it loads, and the GEMM's last bits depend on it)
    (tmp_path / "reference").mkdir()
    reference = _smcli(bags, model, tmp_path / "reference" / "out")
    _, reference_stderr = reference.communicate(timeout=120)
    assert reference.returncode == 0, reference_stderr
    expected = _bag_files(tmp_path / "reference" / "out")
    assert len(expected) == INTERRUPT_BAGS

    interrupted = {out: set(_bag_files(out)) for out in procs}
    resumes = {out: _smcli(bags, model, out, "--skip-existing") for out in procs}
    for out, proc in resumes.items():
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
        n_before = len(interrupted[out])
        assert f"{INTERRUPT_BAGS - n_before} ok, {n_before} skipped, 0 failed" in stderr.splitlines()[-1]
        assert _bag_files(out) == expected  # byte-identical to the uninterrupted run
        rows = bags_rows(out / "_bags.csv")
        assert len(rows) == INTERRUPT_BAGS
        assert {k for k, r in rows.items() if r["status"] == "skipped"} == interrupted[out]
        no_figures = sorted(k for k, r in rows.items() if r["n_instances"] in ("", "nan"))
        if no_figures:
            untruthful.append(f"after resume, rows without figures (n_instances): {no_figures}")
        assert tmp_leftovers(out) == []
    assert not untruthful, "the bags file and summary must match the files in place:\n" + "\n".join(
        untruthful
    )


def _raise_signal_at(monkeypatch, moment: str) -> None:
    """Deliver a real SIGINT to this process at one precise moment of the work on slide_b."""

    def send() -> None:
        handler = signal.getsignal(signal.SIGINT)
        assert handler is not signal.default_int_handler, "smcli did not install its handler"
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs in this (main) thread right away

    if moment in ("after_table_rename", "after_bags_file_rename"):
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            real_replace(src, dst, *args, **kwargs)
            name = Path(dst).name
            if moment == "after_table_rename" and name == "slide_b.csv":
                send()
            if (
                moment == "after_bags_file_rename"
                and name == "_bags.csv"
                and "slide_b" in bags_rows(Path(dst))
            ):
                send()

        monkeypatch.setattr(os, "replace", replace)
        return
    if moment == "writing_bags_file":
        real_rows = smcli.writers.csv_rows_written

        def rows_written(writer, rows):  # the bags file's rows go to its temporary file here
            real_rows(writer, rows)
            if len(rows) == 2:
                send()

        monkeypatch.setattr(smcli.writers, "csv_rows_written", rows_written)
        return
    real = smcli.writers.write_csv

    def write_csv(table, handle, header):
        real(table, handle, header)
        if moment == "writing_table" and Path(str(getattr(handle, "name", ""))).name.startswith(
            ".slide_b.csv."
        ):
            send()

    monkeypatch.setattr(smcli.writers, "write_csv", write_csv)


@pytest.mark.parametrize(
    "moment", ["writing_table", "after_table_rename", "writing_bags_file", "after_bags_file_rename"]
)
def test_interrupt_at_any_moment_keeps_bags_file_and_summary_truthful(
    tmp_path, three_bags, model_file, monkeypatch, moment
):
    """A signal can land anywhere in a bag's commit (table rename, bags-file update, count).

    Whatever the moment, the bags file and the summary line must agree with the files in place.
    """
    out = tmp_path / "out"
    _raise_signal_at(monkeypatch, moment)
    result = invoke("score", three_bags, "-m", model_file, "-o", out)
    monkeypatch.undo()
    assert result.exit_code == 130, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "interrupted by SIGINT" in last
    assert tmp_leftovers(out) == []
    written = {p.stem for p in out.glob("slide_*.csv")}
    assert "slide_a" in written and "slide_c" not in written
    listed = set(bags_rows(out / "_bags.csv"))
    assert listed == written, f"bag files {sorted(written)} but _bags.csv lists {sorted(listed)}"
    assert (
        f"smcli: {len(written)} ok, 0 skipped, 0 failed; interrupted by SIGINT, {3 - len(written)} not done"
        in last
    )


# ---------------------------------------------------------------------- 4. failure isolation


@pytest.fixture
def bags_with_a_bad_middle(tmp_path, make_bag):
    directory = tmp_path / "bags"
    make_bag(directory, "slide_a", seed=1)
    (directory / "slide_b.safetensors").write_bytes(b"\x00" * 40)
    make_bag(directory, "slide_c", rows=3, seed=3)
    return directory


def test_fail_fast_stops_at_the_first_failing_bag(tmp_path, bags_with_a_bad_middle, model_file):
    out = tmp_path / "out"
    result = invoke("score", bags_with_a_bad_middle, "-m", model_file, "-o", out, "--fail-fast")
    assert result.exit_code == 1
    assert sorted(p.name for p in out.iterdir() if p.name[0] != ".") == ["_bags.csv", "slide_a.csv"]
    assert {k: r["status"] for k, r in bags_rows(out / "_bags.csv").items()} == {
        "slide_a": "ok",
        "slide_b": "error",
    }
    assert len(error_lines(result.stderr)) == 1
    assert result.stderr.splitlines()[-1].startswith("smcli: 1 ok, 0 skipped, 1 failed")


def test_fail_fast_with_a_single_table_writes_no_table(tmp_path, bags_with_a_bad_middle, model_file):
    table = tmp_path / "out" / "scores.csv"
    table.parent.mkdir()
    result = invoke("score", bags_with_a_bad_middle, "-m", model_file, "-o", table, "--fail-fast")
    assert result.exit_code == 1
    assert list(table.parent.iterdir()) == []


def test_without_fail_fast_every_good_bag_is_written_and_counted(
    tmp_path, bags_with_a_bad_middle, model_file, make_bag
):
    out = tmp_path / "out"
    result = invoke("score", bags_with_a_bad_middle, "-m", model_file, "-o", out)
    assert result.exit_code == 1
    listed = sorted(p.name for p in out.iterdir() if p.name[0] != ".")
    assert listed == ["_bags.csv", "slide_a.csv", "slide_c.csv"]
    assert result.stderr.splitlines()[-1].startswith("smcli: 2 ok, 0 skipped, 1 failed")

    make_bag(bags_with_a_bad_middle, "slide_d", rows=2, seed=4)
    again = invoke("score", bags_with_a_bad_middle, "-m", model_file, "-o", out, "--skip-existing")
    assert again.exit_code == 1
    assert again.stderr.splitlines()[-1].startswith("smcli: 1 ok, 2 skipped, 1 failed")
    statuses = {k: r["status"] for k, r in bags_rows(out / "_bags.csv").items()}
    assert statuses == {"slide_a": "skipped", "slide_b": "error", "slide_c": "skipped", "slide_d": "ok"}


# ------------------------------------------------------------------- 5. every bad input caught


def _valid_bag_bytes() -> bytes:
    return save(good_tensors(), metadata={"patch_size": str(PATCH)})


def _header_len_past_end(path: Path) -> None:
    data = _valid_bag_bytes()
    path.write_bytes(struct.pack("<Q", len(data) + 100) + data[8:])


def _invalid_json_header(path: Path) -> None:
    data = _valid_bag_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = b'{"features": {"dtype": "F32", oops'.ljust(n, b" ")
    path.write_bytes(data[:8] + header + data[8 + n :])


def _with(**tensors):
    def make(path: Path) -> None:
        base = good_tensors()
        base.update(tensors)
        write_tensors(path, {k: v for k, v in base.items() if v is not None}, patch_size=PATCH)

    return make


def _metadata(**metadata):
    def make(path: Path) -> None:
        write_tensors(path, good_tensors(), **{"patch_size": PATCH, **metadata})

    return make


def _nan_feature_rows(path: Path) -> None:
    tensors = good_tensors()
    tensors["features"][3, 1] = float("nan")
    tensors["features"][7, 0] = float("inf")
    tensors["features"][11, :] = float("-inf")
    write_tensors(path, tensors, patch_size=PATCH)


def _nan_coords(path: Path) -> None:
    tensors = good_tensors()
    coords = tensors["coords"].to(torch.float32)
    coords[4, 1] = float("nan")
    coords[9, 0] = float("inf")
    tensors["coords"] = coords
    write_tensors(path, tensors, patch_size=PATCH)


N_GOOD = 20  # rows of good_tensors()
BAD_BAGS = {
    "not_safetensors": (
        lambda p: p.write_bytes(b"PK\x03\x04 this is a zip, not a bag" * 3),
        ["not a safetensors"],
    ),
    "empty_file": (lambda p: p.write_bytes(b""), ["not a safetensors"]),
    "truncated": (lambda p: p.write_bytes(_valid_bag_bytes()[: len(_valid_bag_bytes()) * 2 // 3]), []),
    "header_past_end": (_header_len_past_end, []),
    "invalid_json_header": (_invalid_json_header, []),
    "missing_features": (
        lambda p: write_tensors(p, {"feats": random_features(20), "coords": torch.from_numpy(grid())}),
        ["no 'features' tensor", "keys present: coords, feats"],
    ),
    "missing_coords": (
        lambda p: write_tensors(p, {"features": random_features(20), "xy": torch.from_numpy(grid())}),
        ["no 'coords' tensor", "keys present: features, xy"],
    ),
    "features_1d": (_with(features=random_features(20).reshape(-1)), ["features must be 2-D", "(160,)"]),
    "features_batch_2": (
        _with(features=random_features(40).reshape(2, 20, IN_DIM)),
        ["features must be 2-D"],
    ),
    "features_int": (_with(features=torch.ones(20, IN_DIM, dtype=torch.int64)), ["features has dtype int64"]),
    "coords_n3": (_with(coords=torch.zeros(20, 3, dtype=torch.int64)), ["coords must have shape (N, 2)"]),
    "coords_bool": (_with(coords=torch.zeros(20, 2, dtype=torch.bool)), ["coords has dtype bool"]),
    "coords_float8": (_with(coords=torch.from_numpy(grid()).to(torch.float8_e4m3fn)), ["coords"]),
    "labels_float8": (_with(labels=torch.zeros(20).to(torch.float8_e5m2)), ["labels"]),
    "labels_not_binary": (_with(labels=torch.full((20,), 2, dtype=torch.uint8)), ["labels must hold 0/1"]),
    "row_counts_differ": (
        _with(coords=torch.from_numpy(grid()[:19])),
        ["features has 20 rows but coords has 19"],
    ),
    "width_mismatch": (
        _with(features=random_features(20, dim=IN_DIM + 3)),
        [f"features have {IN_DIM + 3} columns, the model expects {IN_DIM}"],
    ),
    "nan_features": (_nan_feature_rows, ["non-finite", "in 3 of 20 rows"]),
    "nan_coords": (_nan_coords, ["coords has non-finite values in 2 rows"]),
    "empty_bag": (
        _with(features=torch.zeros(0, IN_DIM), coords=torch.zeros(0, 2, dtype=torch.int64)),
        ["empty bag"],
    ),
    "bad_patch_size": (_metadata(patch_size="abc"), ["patch_size 'abc' is not a number"]),
    "bag_id_too_long": (_metadata(bag_id="x" * 300), []),
    "bag_id_unsafe": (_metadata(bag_id="../escape"), ["cannot be used as a file name"]),
}


@pytest.mark.parametrize("case", sorted(BAD_BAGS))
def test_a_bad_bag_is_one_error_line_and_the_others_are_scored(tmp_path, make_bag, model_file, case):
    make, fragments = BAD_BAGS[case]
    bags = tmp_path / "bags"
    make_bag(bags, "a_good", seed=1)
    bad = bags / f"m_{case}.safetensors"
    make(bad)
    make_bag(bags, "z_good", rows=3, seed=2)
    out = tmp_path / "out"

    result = invoke("score", bags, "-m", model_file, "-o", out)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.exit_code == 1, result.stderr
    errors = error_lines(result.stderr)
    assert len(errors) == 1, result.stderr
    assert str(bad) in errors[0]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert_clean_stderr(result.stderr)
    assert (out / "a_good.csv").exists() and (out / "z_good.csv").exists()
    rows = bags_rows(out / "_bags.csv")
    assert len(rows) == 3
    bad_rows = [r for r in rows.values() if r["path"] == str(bad)]
    assert len(bad_rows) == 1 and bad_rows[0]["status"] == "error"
    assert errors[0] == f"error: {bad_rows[0]['error']}"
    assert result.stderr.splitlines()[-1].startswith("smcli: 2 ok, 0 skipped, 1 failed")
    assert result.stdout == ""


def test_two_inputs_with_one_bag_id_fail_the_second_by_name(tmp_path, make_bag, model_file):
    """The second input claiming a bag_id already written in this run is an error naming it.

    It is not an 'output exists' error (the advice to pass --skip-existing would be wrong), and
    with --skip-existing it must not be reported as skipped: its scores were never written.
    """
    bags = tmp_path / "bags"
    make_bag(bags, "a", bag_id="same", seed=1)
    make_bag(bags, "b", seed=2)
    second = make_bag(bags, "c", bag_id="same", seed=3)
    for extra in ([], ["--skip-existing"], ["--overwrite"]):
        out = tmp_path / f"out{len(extra)}{extra[0] if extra else ''}"
        result = invoke("score", bags, "-m", model_file, "-o", out, *extra)
        assert result.exit_code == 1, (extra, result.stderr)
        errors = error_lines(result.stderr)
        assert len(errors) == 1, (extra, result.stderr)
        assert str(second) in errors[0] and "same" in errors[0], (extra, errors[0])
        assert "--skip-existing" not in errors[0], (extra, errors[0])
        statuses = sorted(r["status"] for r in pd.read_csv(out / "_bags.csv", dtype=str).to_dict("records"))
        assert statuses == ["error", "ok", "ok"], (extra, statuses)


def test_coords_beyond_the_grid_range_give_no_python_warning(tmp_path, make_bag, model_file):
    """coords / patch_size past int64 (a patch_size of 1e-300): smcli's own one-liners only."""
    import warnings

    bags = tmp_path / "bags"
    tiny = make_bag(bags, "tiny_step", patch_size="1e-300")
    make_bag(bags, "z_good", seed=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = invoke("score", bags, "-m", model_file, "-o", tmp_path / "out")
    assert result.exit_code in (0, 1)
    assert_clean_stderr(result.stderr)
    leaked = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught]
    assert leaked == [], f"Python warnings reach stderr for {tiny}: {leaked}"
    assert (tmp_path / "out" / "z_good.csv").exists()


def test_features_with_a_batch_axis_of_one_score_like_2d(tmp_path, model_file):
    bags = tmp_path / "bags"
    tensors = good_tensors(seed=5)
    write_tensors(bags / "flat.safetensors", tensors, patch_size=PATCH)
    write_tensors(
        bags / "batched.safetensors", {**tensors, "features": tensors["features"][None]}, patch_size=PATCH
    )
    result = invoke("score", bags, "-m", model_file)
    assert result.exit_code == 0, result.stderr
    table = pd.read_csv(io.StringIO(result.stdout))
    flat = table[table["bag_id"] == "flat"].drop(columns="bag_id").reset_index(drop=True)
    batched = table[table["bag_id"] == "batched"].drop(columns="bag_id").reset_index(drop=True)
    assert len(flat) == N_GOOD
    pd.testing.assert_frame_equal(flat, batched, check_exact=True)


class Outcome:
    """exit_code and stderr of a run, in-process or in an unprivileged child process."""

    def __init__(self, exit_code: int, stderr: str) -> None:
        self.exit_code, self.stderr = exit_code, stderr


NOBODY = 65534


def _as_nobody(*args: str) -> list[str]:
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *args]


@pytest.fixture
def permission_run(tmp_path):
    """(workdir, run): run(*args) scores with file permissions enforced.

    Permission checks do not bind root (CI runs as root), so as root the command runs as user
    nobody (setpriv) in a world-readable work directory; otherwise in-process as usual.
    """
    if os.geteuid() != 0:
        return tmp_path, lambda *args: invoke(*args)
    import shutil
    import tempfile

    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot drop privileges")
    workdir = Path(tempfile.mkdtemp(prefix="smcli-perm-"))
    workdir.chmod(0o777)  # nobody creates the outputs here
    probe = subprocess.run(_as_nobody(sys.executable, "-c", "import smcli"), capture_output=True, timeout=60)
    if probe.returncode != 0:
        shutil.rmtree(workdir)
        pytest.skip("user nobody cannot run this interpreter or import smcli")

    def run(*args):
        for path in [workdir, *workdir.rglob("*")]:  # readable by nobody, except what the test locked
            if path.stat().st_mode & 0o777 not in (0, 0o555):
                path.chmod(0o777 if path.is_dir() else 0o644)
        done = subprocess.run(
            _as_nobody(sys.executable, "-m", "smcli", *map(str, args)),
            capture_output=True,
            text=True,
            timeout=120,
            cwd=workdir,
        )
        return Outcome(done.returncode, done.stderr)

    yield workdir, run
    shutil.rmtree(workdir, ignore_errors=True)


def test_an_unreadable_bag_is_one_error_line(permission_run, make_bag, model_file):
    workdir, run = permission_run
    bags = workdir / "bags"
    locked = make_bag(bags, "locked")
    make_bag(bags, "open", seed=2)
    model = workdir / "model.safetensors"
    model.write_bytes(Path(model_file).read_bytes())
    locked.chmod(0)
    try:
        result = run("score", bags, "-m", model, "-o", workdir / "out")
    finally:
        locked.chmod(0o644)
    assert result.exit_code == 1, result.stderr
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and str(locked) in errors[0] and "permission denied" in errors[0]
    assert (workdir / "out" / "open.csv").exists()


def test_a_read_only_output_directory_exits_2(permission_run, make_bag, model_file):
    workdir, run = permission_run
    bags = workdir / "bags"
    make_bag(bags, "slide_a")
    model = workdir / "model.safetensors"
    model.write_bytes(Path(model_file).read_bytes())
    out = workdir / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        result = run("score", bags, "-m", model, "-o", out)
    finally:
        out.chmod(0o755)
    assert result.exit_code == 2, result.stderr
    assert "not writable" in result.stderr


def test_an_output_directory_that_cannot_be_created_exits_2(tmp_path, three_bags, model_file):
    blocker = tmp_path / "afile"
    blocker.write_text("I am a file")
    for out in (blocker / "out", blocker / "deeper" / "out"):
        result = invoke("score", three_bags, "-m", model_file, "-o", out)
        assert result.exit_code == 2
        assert result.stderr.startswith(f"error: {out}: cannot create output directory")
        assert len(result.stderr.strip().splitlines()) == 1
    blocked = blocker / "scores.csv"  # a table's missing parent is created, unless a file is in the way
    result = invoke("score", three_bags, "-m", model_file, "-o", blocked)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {blocked}: cannot create the directory {blocker}")
    assert blocker.read_text() == "I am a file"
    table = tmp_path / "missing" / "scores.csv"
    assert invoke("score", three_bags, "-m", model_file, "-o", table).exit_code == 0
    assert table.is_file()


def _warning_run(tmp_path, model_file, coords: np.ndarray, *extra, **metadata):
    bags = tmp_path / "bags"
    path = write_tensors(
        bags / "warned.safetensors",
        {"features": random_features(len(coords)), "coords": torch.from_numpy(coords)},
        **metadata,
    )
    out = tmp_path / "out"
    result = invoke("score", bags, "-m", model_file, "-o", out, *extra)
    assert result.exit_code == 0, result.stderr
    assert_clean_stderr(result.stderr)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    row = bags_rows(out / "_bags.csv")["warned"]
    return path, warnings, row


def test_warning_for_patches_sharing_a_grid_cell(tmp_path, model_file):
    coords = grid(4, 4)
    coords[5] = coords[6]  # two patches on one cell
    coords[9] = coords[10] + 10  # same cell, a few pixels apart
    path, warnings, row = _warning_run(tmp_path, model_file, coords, patch_size=PATCH)
    assert len(warnings) == 1
    assert warnings[0].startswith(f"warning: {path}: 2 patches share a grid cell")
    assert "2 patches share a grid cell" in row["warnings"]


@pytest.mark.parametrize("where", ["flag", "bag"])
def test_warning_for_a_graph_without_edges_names_the_inferred_step(tmp_path, model_file, where):
    coords = grid(5, 4, step=512)
    extra = ["--patch-size", "256"] if where == "flag" else []
    metadata = {} if where == "flag" else {"patch_size": 256}
    path, warnings, row = _warning_run(tmp_path, model_file, coords, *extra, **metadata)
    assert len(warnings) == 1, warnings
    assert f"warning: {path}: graph has no edges at patch step 256 ({where})" in warnings[0]
    assert "step of 512" in warnings[0] and "--patch-size" in warnings[0]
    assert row["n_edges"] == "0"
    assert "graph has no edges" in row["warnings"] and "512" in row["warnings"]


def test_warning_for_a_low_mean_degree(tmp_path, model_file):
    coords = np.array([[0, 0], [256, 0], [512, 0], [768, 0]], dtype=np.int64)  # a line: degree 1.5
    path, warnings, row = _warning_run(tmp_path, model_file, coords, patch_size=PATCH)
    assert len(warnings) == 1
    assert "mean degree 1.50" in warnings[0] and str(path) in warnings[0]
    assert row["n_edges"] == "3" and "mean degree 1.50" in row["warnings"]


def test_a_healthy_bag_has_no_warning(tmp_path, model_file):
    _, warnings, row = _warning_run(tmp_path, model_file, grid(5, 4), patch_size=PATCH)
    assert warnings == [] and row["warnings"] == ""


def _pool_state(att_dim: int = ATT_DIM) -> dict:
    torch.manual_seed(0)
    return TorchmilPool(IN_DIM, att_dim).state_dict()


def _config(**pool) -> str:
    document = json.loads(ModelConfig(PoolConfig(IN_DIM, ATT_DIM)).to_json())
    document["pool"].update(pool)
    return json.dumps(document)


MODEL_ERRORS = {
    "not_a_checkpoint": (
        lambda p: p.write_bytes(b"\x80\x04 definitely not safetensors"),
        "not a safetensors",
    ),
    "missing_config": (lambda p: save_file(_pool_state(), str(p)), "no 'smcli_config' metadata"),
    "config_not_json": (
        lambda p: save_file(_pool_state(), str(p), metadata={"smcli_config": "{pool: "}),
        "not valid JSON",
    ),
    "invalid_config": (
        lambda p: save_file(_pool_state(), str(p), metadata={"smcli_config": _config(act="swish")}),
        "invalid config",
    ),
    "config_without_in_dim": (
        lambda p: save_file(_pool_state(), str(p), metadata={"smcli_config": json.dumps({"pool": {}})}),
        "lacks 'in_dim'",
    ),
    "tensors_do_not_fit": (
        lambda p: save_file(_pool_state(att_dim=ATT_DIM + 2), str(p), metadata={"smcli_config": _config()}),
        "tensors do not fit",
    ),
    "missing_file": (lambda p: None, "no such model file"),
}


@pytest.mark.parametrize("case", sorted(MODEL_ERRORS))
def test_model_errors_exit_2_with_one_line(tmp_path, three_bags, case):
    make, fragment = MODEL_ERRORS[case]
    model = tmp_path / "model.safetensors"
    make(model)
    out = tmp_path / "out"
    result = invoke("score", three_bags, "-m", model, "-o", out)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {model}: ")
    assert fragment in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not out.exists()


# ---------------------------------------------------------------------------- 6. safe model files


class _Evil:
    """Unpickling this runs a shell command that creates `target`."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.target)}",))


def _evil_files(tmp_path):
    control = tmp_path / "control_proof"
    pickle.loads(pickle.dumps(_Evil(control)))  # the payload is live: unpickling creates the file
    assert control.exists()
    target = tmp_path / "pwned"
    zipped = tmp_path / "evil.pt"
    torch.save({"proj1.weight": _Evil(target), "proj2.weight": torch.zeros(1, 4)}, zipped)
    raw = tmp_path / "evil_raw.pt"
    raw.write_bytes(pickle.dumps(_Evil(target), protocol=2))
    disguised = tmp_path / "evil.safetensors"
    disguised.write_bytes(zipped.read_bytes())
    return target, {"zip": zipped, "raw": raw, "disguised": disguised}


@pytest.mark.parametrize("kind", ["zip", "raw"])
def test_convert_never_runs_a_pickle(tmp_path, kind):
    target, files = _evil_files(tmp_path)
    out = tmp_path / "out.safetensors"
    result = invoke("convert", files[kind], "-o", out)
    assert result.exit_code == 2
    assert not target.exists()
    assert not out.exists()
    assert result.stderr.startswith(f"error: {files[kind]}: ")
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("kind", ["zip", "raw", "disguised"])
def test_score_never_runs_a_pickle_given_as_model(tmp_path, three_bags, kind):
    target, files = _evil_files(tmp_path)
    result = invoke("score", three_bags / "slide_a.safetensors", "-m", files[kind])
    assert result.exit_code == 2
    assert not target.exists()
    assert result.stderr.startswith(f"error: {files[kind]}: not a safetensors checkpoint")
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


# ------------------------------------------------------------------------------------ 7. scripting


def test_dash_reads_bag_paths_from_stdin(tmp_path, three_bags, model_file):
    paths = [three_bags / "slide_c.safetensors", three_bags / "slide_a.safetensors"]
    result = invoke("score", "-", "-m", model_file, input="".join(f"{p}\n" for p in paths) + "\n  \n")
    assert result.exit_code == 0, result.stderr
    table = pd.read_csv(io.StringIO(result.stdout))
    assert table["bag_id"].unique().tolist() == ["slide_c", "slide_a"]
    assert len(table) == 12 + 20
    assert result.stderr.splitlines()[-1].startswith("smcli: 2 ok, 0 skipped, 0 failed")

    out = tmp_path / "out"
    result = invoke("score", "-", "-m", model_file, "-o", out, input=f"{paths[0]}\n")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.iterdir() if p.name[0] != ".") == ["_bags.csv", "slide_c.csv"]


def test_dash_with_empty_stdin_exits_2(model_file):
    result = invoke("score", "-", "-m", model_file, input="")
    assert result.exit_code == 2
    assert "no inputs" in result.stderr


@pytest.fixture
def seven_bags(tmp_path, make_bag):
    directory = tmp_path / "bags"
    for i in range(7):
        make_bag(directory, f"s{i}", rows=2 + i % 3, seed=i)
    return directory


def test_shards_partition_the_bags_deterministically(tmp_path, seven_bags, model_file):
    out = tmp_path / "out"
    shards = {}
    for k in (1, 2, 3):
        result = invoke("score", seven_bags, "-m", model_file, "-o", out, "--shard", f"{k}/3")
        assert result.exit_code == 0, result.stderr
        bags_file = out / f"_bags.shard-{k}-of-3.csv"
        assert bags_file.exists()
        shards[k] = set(bags_rows(bags_file))
    all_bags = {f"s{i}" for i in range(7)}
    assert set().union(*shards.values()) == all_bags
    assert sum(len(s) for s in shards.values()) == 7  # no overlap
    assert all(shards.values())
    assert {p.stem for p in out.glob("s*.csv")} == all_bags
    assert not (out / "_bags.csv").exists()

    concatenated = pd.concat(
        [pd.read_csv(out / f"_bags.shard-{k}-of-3.csv", dtype=str) for k in (1, 2, 3)], ignore_index=True
    )
    assert sorted(concatenated["bag_id"]) == sorted(all_bags)
    assert set(concatenated["status"]) == {"ok"}

    # the same shard again, inputs listed one by one in another order: the same bags
    again = tmp_path / "again"
    files = sorted(seven_bags.glob("*.safetensors"), reverse=True)
    result = invoke("score", *files, "-m", model_file, "-o", again, "--shard", "2/3")
    assert result.exit_code == 0, result.stderr
    assert set(bags_rows(again / "_bags.shard-2-of-3.csv")) == shards[2]
    for bag_id in shards[2]:
        assert (again / f"{bag_id}.csv").read_bytes() == (out / f"{bag_id}.csv").read_bytes()


@pytest.mark.parametrize("text", ["0/3", "4/3", "x", "1-3", "1/0", "/3", "1/3/5", "-1/3", "a/b", ""])
def test_invalid_shard_exits_2(tmp_path, three_bags, model_file, text):
    out = tmp_path / "out"
    result = invoke("score", three_bags, "-m", model_file, "-o", out, "--shard", text)
    assert result.exit_code == 2
    assert "--shard" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


# ------------------------------------------------------------------------------------- 8. progress


def test_non_tty_stderr_has_plain_lines_and_a_final_summary(tmp_path, make_bag, model_file):
    bags = tmp_path / "bags"
    for i in range(24):
        make_bag(bags, f"b{i:02d}", rows=2, cols=2, seed=i)
    (bags / "b05.safetensors").write_bytes(b"broken")
    result = invoke("score", bags, "-m", model_file, "-o", tmp_path / "out")
    assert result.exit_code == 1
    assert_clean_stderr(result.stderr)
    lines = result.stderr.splitlines()
    assert len(error_lines(result.stderr)) == 1
    assert lines[-1].startswith("smcli: 23 ok, 0 skipped, 1 failed (")
    progress = [line for line in lines[:-1] if line.startswith("smcli: ")]
    done = [int(re.fullmatch(r"smcli: (\d+)/24 bags, [\d,]+ patches/s", line).group(1)) for line in progress]
    assert done == sorted(set(done)) and all(0 < k < 24 for k in done)  # plain, growing log lines
    assert result.stdout == ""


def test_summary_line_for_stdout_output(three_bags, model_file):
    result = invoke("score", three_bags, "-m", model_file)
    assert result.exit_code == 0
    assert_clean_stderr(result.stderr)
    assert result.stderr.splitlines()[-1].startswith("smcli: 3 ok, 0 skipped, 0 failed")
    assert result.stdout.startswith("bag_id,instance,x,y,attention_logit,attention_weight\n")


def test_quiet_prints_nothing_on_success_but_still_prints_errors(tmp_path, three_bags, model_file):
    coords = grid(5, 4, step=512)  # a bag that warns (no edges at --patch-size 256)
    write_tensors(
        three_bags / "warned.safetensors",
        {"features": random_features(20), "coords": torch.from_numpy(coords)},
    )
    out = tmp_path / "out"
    result = invoke("score", three_bags, "-m", model_file, "-o", out, "--quiet", "--patch-size", "256")
    assert result.exit_code == 0
    assert result.stderr == ""
    assert "graph has no edges" in bags_rows(out / "_bags.csv")["warned"]["warnings"]

    (three_bags / "slide_b.safetensors").write_bytes(b"broken")
    result = invoke("score", three_bags, "-m", model_file, "-o", tmp_path / "out2", "-q")
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {three_bags / 'slide_b.safetensors'}: ")

    result = invoke("score", three_bags, "-m", tmp_path / "nope.safetensors", "-q")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ")


@pytest.mark.parametrize("change", ["nothing", "model", "input"])
def test_skip_existing_rescores_outputs_another_model_or_input_made(tmp_path, three_bags, model_file, change):
    """A resume keeps only what this model made from these inputs: a kept file scored by another
    model, or from an input file since rewritten, would be a silently wrong number."""
    out = tmp_path / "out"
    assert invoke("score", three_bags, "-m", model_file, "-o", out).exit_code == 0
    kept = file_state(out / "slide_a.csv")
    model = model_file
    if change == "model":
        torch.manual_seed(1)
        state = TorchmilPool(IN_DIM, ATT_DIM).state_dict()
        model = tmp_path / "models" / "other.safetensors"
        save_checkpoint(state, ModelConfig(PoolConfig(IN_DIM, ATT_DIM)), model)
    elif change == "input":
        (three_bags / "slide_a.safetensors").unlink()
        tensors = good_tensors(n_rows=7, seed=9)
        write_tensors(three_bags / "slide_a.safetensors", tensors, patch_size=PATCH)

    result = invoke("score", three_bags, "-m", model, "-o", out, "--skip-existing")
    assert result.exit_code == 0, result.stderr
    status = {name: row["status"] for name, row in bags_rows(out / "_bags.csv").items()}
    if change == "nothing":
        assert status == dict.fromkeys(("slide_a", "slide_b", "slide_c"), "skipped")
        assert file_state(out / "slide_a.csv") == kept
        return
    expected = "ok" if change == "model" else "skipped"
    assert status["slide_a"] == "ok"
    assert status["slide_b"] == status["slide_c"] == expected
    fresh = invoke("score", three_bags / "slide_a.safetensors", "-m", model)
    assert (out / "slide_a.csv").read_text() == fresh.stdout  # what this model makes of this input
