"""Issue 9 hardening: every edge a real cohort hits, one property/fuzz test per class of bad input.

Each test generates many cases (hypothesis, or a seeded generator for subprocess runs) and checks
the batch rule: anything about one input becomes that input's `error` row and the batch goes on
(exit 1 at the end); only usage and model problems exit 2; every error is one line naming the file.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

pytest.importorskip("torchmil")
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors.torch import save_file
from torchmil.nn import SmAttentionPool as TorchmilPool
from typer.testing import CliRunner

from smcli.checkpoint import ModelConfig, PoolConfig, load_model, save_checkpoint
from smcli.cli import app
from smcli.scoring import score_bags

IN_DIM = 8
ATT_DIM = 4
PATCH = 256


def fast(examples: int) -> settings:
    """Few, reproducible examples: every one runs the real batch."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


runner = CliRunner()


def invoke(*args, input=None):
    """The CLI in-process; an exception escaping smcli (a traceback in a shell) fails the test."""
    result = runner.invoke(app, [str(a) for a in args], input=input)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        trace = "".join(traceback.format_exception(*result.exc_info)).splitlines()
        pytest.fail("smcli crashed:\n" + "\n".join(trace[-8:]) + f"\nstderr: {result.stderr}")
    assert "Traceback" not in result.stderr
    return result


def grid(rows: int, cols: int, step: int = PATCH) -> np.ndarray:
    return np.ascontiguousarray(np.argwhere(np.ones((rows, cols))).astype(np.int64) * step)


def write_bag(path: Path, n_rows: int = 4, n_cols: int = 3, seed: int = 0, step: int = PATCH, **metadata):
    coords = grid(n_rows, n_cols, step)
    features = torch.randn(len(coords), IN_DIM, generator=torch.Generator().manual_seed(seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {"features": features, "coords": torch.from_numpy(coords)},
        str(path),
        metadata={k: str(v) for k, v in metadata.items()} or None,
    )
    return path


def write_clam(path: Path, seed: int = 0, step: int = PATCH) -> Path:
    coords = grid(4, 3, step).astype(np.int32)
    with h5py.File(path, "w") as handle:
        handle["features"] = np.random.default_rng(seed).normal(size=(len(coords), IN_DIM)).astype(np.float32)
        handle["coords"] = coords
    return path


def bags_rows(path: Path) -> list[dict[str, str]]:
    return pd.read_csv(path, dtype=str, keep_default_na=False).to_dict("records")


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    state = TorchmilPool(IN_DIM, ATT_DIM).state_dict()
    state["sm.sm.coef"] = torch.tensor(1.3)
    path = tmp_path_factory.mktemp("model") / "pool.safetensors"
    save_checkpoint(state, ModelConfig(PoolConfig(IN_DIM, ATT_DIM)), path)
    return path


@pytest.fixture(scope="module")
def model(model_path):
    return load_model(model_path)


# ------------------------------------------------- §2 (b) h5 attributes of any type never escape

ATTRIBUTE_VALUES = st.one_of(
    st.text(max_size=6),
    st.binary(max_size=6),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.complex_numbers(),
    st.booleans(),
    hnp.arrays(
        st.sampled_from(["i1", "i8", "u8", "f4", "f8", "c8", "S3", "?"]),
        hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
    ),
)
ATTRIBUTE_PLACES = st.sampled_from(
    [
        ("", "unit"),
        ("", "tile_size_um"),
        ("coords", "patch_size_level0"),
        ("coords", "tile_size_um"),
        ("coords", "unit"),
        ("features", "unit"),
        ("", "patch_size"),
    ]
)


@fast(60)
@given(attributes=st.lists(st.tuples(ATTRIBUTE_PLACES, ATTRIBUTE_VALUES), min_size=1, max_size=3))
def test_h5_attributes_of_any_type_are_used_ignored_or_that_bags_error(model, attributes):
    with tempfile.TemporaryDirectory() as tmp:
        odd = write_clam(Path(tmp) / "odd.h5", seed=1)
        with h5py.File(odd, "a") as handle:
            for (owner, name), value in attributes:
                try:
                    (handle[owner] if owner else handle).attrs[name] = value
                except (TypeError, ValueError, OSError):
                    assume(False)  # a value h5py itself cannot store
        good = write_clam(Path(tmp) / "zz_good.h5", seed=2)
        results = list(score_bags([odd, good], model))  # an escaping exception fails the test
    assert [r.summary.path for r in results] == [str(odd), str(good)]
    assert results[1].ok
    first = results[0].summary
    assert first.status in ("ok", "error")
    if first.status == "error":
        assert first.error.startswith(f"{odd}: ") and "\n" not in first.error
        assert "unexpected" not in first.error, first.error  # a foreseen case, not the last line of defence


# ----------------------------------- §2 (c, d) inputs that are no regular file, or not UTF-8 names


def _make_input(directory: Path, kind: str, index: int, raw_name: bytes) -> Path:
    """One input of the given kind; its name is `raw_name` (any bytes but '/' and NUL) + index."""
    name = os.fsdecode(raw_name + b"_%d" % index)
    if kind == "fifo":
        path = directory / f"{name}.h5"
        os.mkfifo(path)
    elif kind == "socket":
        path = directory / f"{name}.safetensors"
        server = socket.socket(socket.AF_UNIX)
        server.bind(os.fsencode(path))
        server.close()
    elif kind == "directory":
        path = directory / f"{name}.safetensors"
        path.mkdir()
    elif kind == "device":
        path = directory / f"{name}.safetensors"
        path.symlink_to("/dev/null")
    elif kind == "link_to_fifo":
        target = directory / f"target_{index}"
        os.mkfifo(target)
        path = directory / f"{name}.safetensors"
        path.symlink_to(target)
    elif kind == "safetensors":
        path = write_bag(directory / f"{name}.safetensors", seed=index)
    else:
        path = write_clam(directory / f"{name}.h5", seed=index)
    return path


NAMES = st.binary(min_size=1, max_size=8).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b"..")
)
KINDS = st.sampled_from(["fifo", "socket", "directory", "device", "link_to_fifo", "safetensors", "h5"])


@fast(25)
@given(inputs=st.lists(st.tuples(KINDS, NAMES), min_size=1, max_size=5))
def test_fifos_devices_sockets_and_non_utf8_names_are_each_that_inputs_error_row(model_path, inputs):
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "in"
        directory.mkdir()
        paths = [_make_input(directory, kind, i, name) for i, (kind, name) in enumerate(inputs)]
        good = write_bag(Path(tmp) / "zz_good.safetensors", seed=99)
        out = Path(tmp) / "out"
        result = invoke("score", *paths, good, "-m", model_path, "-o", out)
        assert result.exit_code in (0, 1), result.stderr
        rows = bags_rows(out / "_bags.csv")  # readable as UTF-8 by any tool
        assert (out / "zz_good.csv").exists()
        bad = [
            p
            for (kind, _), p in zip(inputs, paths, strict=True)
            if kind not in ("safetensors", "h5", "directory")
            or (kind != "directory" and not (_utf8(p) and p.stem.isprintable()))
        ]  # a directory given as input means the bags in it (none here)
        errors = error_lines(result.stderr)
        assert len([r for r in rows if r["status"] == "error"]) == len(bad) == len(errors)
        assert result.exit_code == (1 if bad else 0)
        lines = [line for line in result.stderr.splitlines() if not line.startswith("note:")]
        assert len(lines) == len(errors) + 1  # + the summary: one line each
        for path, line in zip(bad, errors, strict=True):
            index = paths.index(path)  # whatever bytes the name has, the line names this file
            assert (
                line.startswith(f"error: {directory}/") and f"_{index}.{path.name.rsplit('.')[-1]}: " in line
            )
            kind_named = any(word in line for word in ("FIFO", "socket", "device"))
            unnamable = "cannot be used as a file name" in line and not path.stem.isprintable()
            assert kind_named or unnamable or ("not valid UTF-8" in line and not _utf8(path)), line


def _utf8(path: Path) -> bool:
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def test_a_fifo_input_neither_blocks_the_run_nor_the_signal_handlers(tmp_path, model_path):
    """A real process: on the old code it blocked forever in open() (and SIGTERM could not stop it)."""
    bags = tmp_path / "bags"
    bags.mkdir()
    os.mkfifo(bags / "pipe.h5")
    write_bag(bags / "zz_good.safetensors")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "smcli",
            "score",
            str(bags / "pipe.h5"),
            str(bags / "zz_good.safetensors"),
            "-m",
            str(model_path),
            "-o",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert f"error: {bags / 'pipe.h5'}: is a FIFO (named pipe), not a bag file" in proc.stderr.splitlines()
    assert (tmp_path / "out" / "zz_good.csv").exists()


def test_a_fifo_given_as_the_model_is_a_model_error_not_a_hang(tmp_path):
    write_bag(tmp_path / "a.safetensors")
    os.mkfifo(tmp_path / "model.safetensors")
    result = invoke("score", tmp_path / "a.safetensors", "-m", tmp_path / "model.safetensors")
    assert result.exit_code == 2
    assert result.stderr == f"error: {tmp_path / 'model.safetensors'}: not a regular file\n"


def test_sigterm_ends_a_run_whose_reader_is_stuck_in_the_kernel(tmp_path, model_path):
    """A read that never returns (a hung network mount; here a read that waits forever) must not
    keep SIGTERM from ending the run: exit 143, summary line, the bag before it written."""
    import signal
    import time

    write_bag(tmp_path / "bags" / "a_good.safetensors", patch_size=PATCH)
    write_bag(tmp_path / "bags" / "b_stuck.safetensors", patch_size=PATCH)
    probe = (
        "import sys, threading\n"
        "import smcli.scoring as scoring\n"
        "real = scoring.load_bag\n"
        "def load_bag(path, *args, **kwargs):\n"
        "    if 'stuck' in str(path):\n"
        "        print('stuck', file=sys.stderr, flush=True)\n"
        "        threading.Event().wait()  # never returns\n"
        "    return real(path, *args, **kwargs)\n"
        "scoring.load_bag = load_bag\n"
        "from smcli.cli import main\n"
        "sys.argv = ['smcli', *sys.argv[1:]]\n"
        "main()\n"
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            probe,
            "score",
            str(tmp_path / "bags"),
            "-m",
            str(model_path),
            "-o",
            str(tmp_path / "out"),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr.readline() == "stuck\n"
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    try:
        _, stderr = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("SIGTERM did not end the run: the stuck reader thread was joined")
    assert proc.returncode == 143, stderr
    assert "interrupted by SIGTERM" in stderr.splitlines()[-1] and "Traceback" not in stderr
    assert (tmp_path / "out" / "a_good.csv").exists()


# ------------------------------- §2 (a) + §5: resume, rows kept, outputs verified, stale temporaries


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _check_directory_truth(out: Path, steps_inferred: set[float], stderr: str) -> None:
    """_bags.csv describes every output file: one ok/skipped row with its figures per file on disk."""
    rows = bags_rows(out / "_bags.csv")
    kept = {r["bag_id"]: r for r in rows if r["status"] in ("ok", "skipped")}
    files = {p.stem for p in out.glob("*.csv") if not p.name.startswith("_bags")}
    assert set(kept) == files, (sorted(kept), sorted(files))
    for bag_id, row in kept.items():
        assert row["n_instances"] and row["patch_step"], row  # no skipped row without figures
        n_lines = (out / f"{bag_id}.csv").read_bytes().count(b"\n")
        assert n_lines - 1 == int(row["n_instances"]), (bag_id, n_lines)
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []
    notes = [line for line in stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == len(steps_inferred), notes  # once per distinct inferred step


RUNS = st.lists(
    st.tuples(
        st.lists(st.integers(0, 5), min_size=1, max_size=6, unique=True),  # which bags this run gets
        st.sampled_from(["--skip-existing", "--overwrite", None]),
        st.lists(st.tuples(st.integers(0, 5), st.integers(0, 12)), max_size=2),  # truncate bag i at k lines
        st.booleans(),  # leave a stale temporary of a dead process
    ),
    min_size=1,
    max_size=3,
)


@fast(12)
@given(runs=RUNS)
def test_resumed_and_repeated_runs_keep_bags_csv_truthful(model_path, runs):
    """Runs into one directory, with --skip-existing / --overwrite / neither, h5 bags whose step is
    inferred (two different steps), outputs cut at a line end between runs and temporaries of
    SIGKILLed runs: no crash, and `_bags.csv` always lists every output file with figures that
    match it."""
    with tempfile.TemporaryDirectory() as tmp:
        bags = [write_clam(Path(tmp) / f"bag_{i}.h5", seed=i, step=PATCH * (1 + i % 2)) for i in range(6)]
        out = Path(tmp) / "out"
        for chosen, flag, cuts, stale in runs:
            if out.is_dir():
                # a kept file cut at a line end: what --skip-existing must notice (among its inputs)
                cuts = [(i, k) for i, k in cuts if i in chosen] if flag == "--skip-existing" else []
                for index, keep_lines in cuts:
                    target = out / f"bag_{index}.csv"
                    if target.exists():
                        lines = target.read_bytes().splitlines(keepends=True)
                        target.write_bytes(b"".join(lines[:keep_lines]))
                if stale:
                    (out / f".bag_0.csv.{_dead_pid()}.tmp").write_bytes(b"bag_id,instance,x\n")
                    (out / f"._bags.csv.{_dead_pid()}.tmp").write_bytes(b"bag_id\n")
            inputs = [bags[i] for i in sorted(chosen)]
            result = invoke("score", *inputs, "-m", model_path, "-o", out, *([flag] if flag else []))
            assert result.exit_code in (0, 1), result.stderr
            if flag == "--overwrite":  # every chosen bag scored: one note per distinct inferred step
                assert _noted_steps(result.stderr) == {PATCH * (1 + i % 2) for i in chosen}
            _check_directory_truth(out, _noted_steps(result.stderr), result.stderr)


def _noted_steps(stderr: str) -> set[float]:
    return {
        float(line.split("patch step ")[1].split()[0])
        for line in stderr.splitlines()
        if line.startswith("note:")
    }


def test_scoring_bags_one_by_one_into_a_directory_keeps_every_row(tmp_path, model_path):
    bags = [write_bag(tmp_path / f"bag_{i:03d}.safetensors", seed=i, patch_size=PATCH) for i in range(3)]
    out = tmp_path / "out"
    for bag in bags:
        assert invoke("score", bag, "-m", model_path, "-o", out).exit_code == 0
    rows = bags_rows(out / "_bags.csv")
    assert [r["bag_id"] for r in rows] == ["bag_000", "bag_001", "bag_002"]
    again = invoke("score", bags[1], "-m", model_path, "-o", out, "--overwrite")
    assert again.exit_code == 0
    rows = bags_rows(out / "_bags.csv")
    assert sorted(r["bag_id"] for r in rows) == ["bag_000", "bag_001", "bag_002"]  # replaced, not added
    (out / "bag_000.csv").unlink()
    invoke("score", bags[2], "-m", model_path, "-o", out, "--overwrite")
    assert sorted(r["bag_id"] for r in bags_rows(out / "_bags.csv")) == ["bag_001", "bag_002"]


def test_skip_existing_rescores_an_output_cut_at_a_line_end(tmp_path, model_path):
    bag = write_bag(tmp_path / "big.safetensors", n_rows=40, n_cols=25, patch_size=PATCH)
    out = tmp_path / "out"
    assert invoke("score", bag, "-m", model_path, "-o", out).exit_code == 0
    whole = (out / "big.csv").read_bytes()
    (out / "big.csv").write_bytes(b"".join(whole.splitlines(keepends=True)[:100]))  # `head -100`
    result = invoke("score", bag, "-m", model_path, "-o", out, "--skip-existing")
    assert result.exit_code == 0
    assert "1 ok, 0 skipped" in result.stderr
    assert (out / "big.csv").read_bytes() == whole


def test_concurrent_skip_existing_runs_leave_no_row_without_figures(tmp_path, model_path):
    """Two overlapping resumes at once: each run's exclusive bags keep their rows (the old code's
    last writer dropped the other's), and a bag one run skips because the other wrote it has figures."""
    bags = [
        write_bag(tmp_path / "bags" / f"b{i:02d}.safetensors", n_rows=6, n_cols=6, seed=i, patch_size=PATCH)
        for i in range(16)
    ]
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "smcli", "score", *map(str, chosen), "-m", str(model_path), "-o", str(out)]
            + ["--skip-existing"],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for chosen in (bags[:11], bags[5:])
    ]
    for proc in procs:
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
    _check_directory_truth(out, set(), "")
    assert len(bags_rows(out / "_bags.csv")) == 16


# ------------------------------------------- §3 duplicate bag_id in a single table (file or stdout)


@fast(15)
@given(
    placement=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 3)), min_size=2, max_size=6, unique=True),
    target=st.sampled_from(["all.csv", "all.parquet", "-"]),
)
def test_a_single_table_never_holds_one_bag_id_twice(model_path, placement, target):
    """Bag files named name_<j> in directories d<i>: a name met again is that input's error."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = [
            write_bag(Path(tmp) / f"d{i}" / f"name_{j}.safetensors", seed=i * 7 + j) for i, j in placement
        ]
        extra = [] if target == "-" else ["-o", Path(tmp) / target]
        result = invoke("score", *paths, "-m", model_path, *extra)
        names = [p.stem for p in paths]
        duplicates = [p for k, p in enumerate(paths) if p.stem in names[:k]]
        assert result.exit_code == (1 if duplicates else 0), result.stderr
        errors = error_lines(result.stderr)
        assert len(errors) == len(duplicates)
        for path, line in zip(duplicates, errors, strict=True):
            assert line.startswith(f"error: {path}: bag_id ") and "already written" in line
        if target == "-":
            import io

            table = pd.read_csv(io.StringIO(result.stdout))
        elif target.endswith(".csv"):
            table = pd.read_csv(Path(tmp) / target)
        else:
            table = pd.read_parquet(Path(tmp) / target)
        first_of_each = {p.stem: p for p in reversed(paths)}
        assert sorted(table["bag_id"].unique()) == sorted(first_of_each)
        assert len(table) == 12 * len(first_of_each)


# ---------------------------------------- §3 model tensors and config: refused at load, exit 2


def _pool_state(head: bool = False) -> dict[str, np.ndarray]:
    torch.manual_seed(1)
    state = {k: v.numpy().copy() for k, v in TorchmilPool(IN_DIM, ATT_DIM).state_dict().items()}
    state["sm.sm.coef"] = np.array(1.3, dtype=np.float32)
    if head:
        state = {f"pool.{k}": v for k, v in state.items()}
        state["last_layer.weight"] = np.ones((1, IN_DIM), np.float32) * 0.1
        state["last_layer.bias"] = np.zeros(1, np.float32)
    return state


@fast(40)
@given(
    head=st.booleans(),
    pick=st.integers(0, 100),
    value=st.sampled_from([np.nan, np.inf, -np.inf]),
    where=st.integers(0, 10_000),
)
def test_a_checkpoint_with_a_non_finite_tensor_is_refused_naming_it(head, pick, value, where):
    from smcli.errors import ModelError

    state = _pool_state(head)
    name = sorted(state)[pick % len(state)]
    flat = state[name].reshape(-1)
    flat[where % flat.size] = value
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bad.safetensors"
        save_checkpoint(state, ModelConfig(PoolConfig(IN_DIM, ATT_DIM), head=head), path)
        with pytest.raises(ModelError, match=rf"^{path}: tensor {name} has 1 non-finite values") as caught:
            load_model(path)
    assert caught.value.exit_code == 2


def test_a_non_finite_checkpoint_exits_2_with_one_line(tmp_path, model_path):
    state = _pool_state()
    state["proj1.bias"][0] = np.nan
    path = tmp_path / "nan.safetensors"
    save_checkpoint(state, ModelConfig(PoolConfig(IN_DIM, ATT_DIM)), path)
    write_bag(tmp_path / "bags" / "a.safetensors")
    result = invoke("score", tmp_path / "bags", "-m", path, "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert result.stderr == f"error: {path}: tensor proj1.bias has 1 non-finite values (NaN or inf)\n"


CONFIG_FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "in_dim": st.sampled_from([IN_DIM, 10**6, 2**40]),
        "att_dim": st.sampled_from([ATT_DIM, 10**5, 2**40]),
        "sm_steps": st.sampled_from([0, 10, 1000, 1001, 10**9]),
        "sm_mode": st.sampled_from(["approx", "exact"]),
        "coef": st.sampled_from([1.3, -1.0, -0.5, 0.0, 1e-17, -1e-30, 1e12, np.inf, np.nan]),
        "dist_thr": st.sampled_from([1.5, 64.0, 65.0, 1e300]),
    },
)


@fast(60)
@given(fields=CONFIG_FIELDS)
def test_any_config_and_coef_load_cheaply_or_are_refused_with_one_line(fields):
    """Absurd configs cost neither memory nor time at load: refused (exit 2) before any allocation."""
    import json
    import time
    import tracemalloc

    from smcli.checkpoint import CONFIG_KEY
    from smcli.errors import ModelError
    from smcli.tensorfile import write_safetensors

    state = _pool_state()
    state["sm.sm.coef"] = np.array(fields.get("coef", 1.3), dtype=np.float32)
    if fields.get("sm_steps") == 0:  # no Sm, no coef tensor (torchmil's Identity)
        del state["sm.sm.coef"]
        fields.pop("coef", None)
    pool = {"in_dim": IN_DIM, "att_dim": ATT_DIM, "sm_alpha": "trainable"}
    pool.update({k: v for k, v in fields.items() if k in ("in_dim", "att_dim", "sm_steps", "sm_mode")})
    document = {"pool": pool, "head": False, "graph": {"dist_thr": fields.get("dist_thr", 1.5)}}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        write_safetensors(path, state, {CONFIG_KEY: json.dumps(document)})
        tracemalloc.start()
        started = time.perf_counter()
        try:
            load_model(path)
            refused = None
        except ModelError as err:
            refused = str(err)
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    assert time.perf_counter() - started < 5
    assert peak < 50 << 20, f"{peak / 2**20:.0f} MiB at load for {fields}"
    must_refuse = (
        pool["in_dim"] != IN_DIM
        or pool["att_dim"] != ATT_DIM
        or pool.get("sm_steps", 10) > 1000
        or not np.isfinite(fields.get("coef", 1.3))
        or (pool.get("sm_mode", "approx") == "approx" and fields.get("coef") == -1.0)
        or fields.get("dist_thr", 1.5) > 64
    )
    assert (refused is not None) == must_refuse, (fields, refused)
    if refused is not None:
        assert refused.startswith(f"{path}: ") and "\n" not in refused


# --------------------------------------- §3 features finite but past float32: never a silent ok


@fast(40)
@given(
    dtype=st.sampled_from(["float32", "float64"]),
    magnitude=st.sampled_from([1.0, 1e30, 1e36, 3e38, 1e39, 1e300]),
    rows=st.lists(st.integers(0, 11), min_size=1, max_size=4, unique=True),
    sign=st.sampled_from([1.0, -1.0]),
)
def test_features_past_float32_are_an_error_never_nan_or_equal_scores_reported_ok(
    model, dtype, magnitude, rows, sign
):
    rng = np.random.default_rng(len(rows))
    features = rng.normal(size=(12, IN_DIM))
    if dtype == "float32" and magnitude > 3.4e38:
        magnitude = 3.4e38  # the largest a float32 file can hold
    features[rows] = sign * magnitude * np.sign(rng.normal(size=(len(rows), IN_DIM)))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.safetensors"
        save_file(
            {"features": torch.from_numpy(features.astype(dtype)), "coords": torch.from_numpy(grid(4, 3))},
            str(path),
            metadata={"patch_size": str(PATCH)},
        )
        (result,) = score_bags([path], model)
    summary = result.summary
    if summary.status == "ok":
        logits = result.arrow.column("attention_logit").to_numpy()
        weights = result.arrow.column("attention_weight").to_numpy()
        assert np.isfinite(logits).all() and np.isfinite(weights).all()
        assert abs(weights.sum() - 1) < 1e-4
        # and no overflow happened on the way: the first projection, in float64, fits float32
        weight, bias = (
            np.asarray(model.module.params[k], np.float64) for k in ("proj1.weight", "proj1.bias")
        )
        assert np.abs(features.astype(dtype).astype(np.float64) @ weight.T + bias).max() < 3.4e38
    else:
        assert summary.error.startswith(f"{path}: ") and "unexpected" not in summary.error
        assert magnitude > 1e36  # ordinary (and merely large) features are never refused
    if magnitude > 3.5e38:
        assert "not representable in float32" in summary.error


def test_complex_features_are_one_error_line_without_a_numpy_warning(tmp_path, model_path):
    path = tmp_path / "bags" / "complex.h5"
    path.parent.mkdir()
    with h5py.File(path, "w") as handle:
        handle["features"] = np.ones((12, IN_DIM), np.complex64)
        handle["coords"] = grid(4, 3)
    write_bag(tmp_path / "bags" / "z_good.safetensors")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a ComplexWarning would fail here
        result = invoke("score", tmp_path / "bags", "-m", model_path, "-o", tmp_path / "out")
    assert result.exit_code == 1
    assert error_lines(result.stderr) == [f"error: {path}: features has dtype complex64; expected numbers"]


# ---------------------------------------------------------------- §3 the graph on far-apart cells


def _brute_force_edges(cells: np.ndarray, dist_thr: float) -> set[tuple[int, int]]:
    edges = set()
    for i in range(len(cells)):
        for j in range(len(cells)):
            if i != j:
                dx, dy = (int(a) - int(b) for a, b in zip(cells[i], cells[j], strict=True))
                if dx * dx + dy * dy <= dist_thr * dist_thr:  # Python ints: exact at any size
                    edges.add((i, j))
    return edges


FAR = st.one_of(st.sampled_from([0, 2**31, 2**32 - 3, 2**32, 2**33 - 6, 2**39]), st.integers(0, 2**39))


@fast(80)
@example(
    anchors=[(0, 0), (2**32, 0), (0, 2**32 - 3)], jitter=[(0, 0, 0), (1, 0, 0), (2, 0, 0)], dist_thr=2**0.5
)
@given(
    anchors=st.lists(st.tuples(FAR, FAR), min_size=1, max_size=4),
    jitter=st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=12
    ),
    dist_thr=st.sampled_from([0.5, 1.0, 2**0.5, 2.0, 2.9]),
)
def test_the_graph_equals_a_brute_force_neighbour_search_on_far_apart_cells(anchors, jitter, dist_thr):
    """Cells near 0, 2^32 and 2^39 (the int64 key wrapped: (0,0), (2^32,0), (0,2^32-3) were neighbours)."""
    from smcli.graph import build_edges, neighbour_edges

    cells = np.array(
        [(anchors[a % len(anchors)][0] + dx, anchors[a % len(anchors)][1] + dy) for a, dx, dy in jitter],
        dtype=np.int64,
    )
    cells -= cells.min(axis=0)
    expected = _brute_force_edges(cells, dist_thr)
    for build in (build_edges, neighbour_edges):
        edges = build(cells, dist_thr)
        assert set(map(tuple, edges.T.tolist())) == expected
        assert edges.shape[1] == len(expected)  # no duplicates


def test_cells_that_used_to_alias_through_the_int64_key_are_not_neighbours():
    from smcli.graph import build_edges

    cells = np.array([[0, 0], [2**32, 0], [0, 2**32 - 3]], dtype=np.int64)
    assert build_edges(cells).shape[1] == 0


# ------------------------------------------------- §4 memory and time in proportion to the input


@fast(25)
@given(
    rows=st.sampled_from([20, 1000, 100_000, 5_000_000]),
    cols=st.sampled_from([IN_DIM, 1024]),
    written=st.sampled_from([0, 1, 20]),
    chunk_rows=st.sampled_from([10, 1000]),
)
def test_an_h5_declaring_more_than_it_stores_is_refused_before_reading(rows, cols, written, chunk_rows):
    import tracemalloc

    from smcli.bags import load_bag
    from smcli.errors import BagError

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "declared.h5"
        with h5py.File(path, "w") as handle:
            features = handle.create_dataset(
                "features", shape=(rows, cols), dtype="f4", chunks=(min(chunk_rows, rows), cols)
            )
            if written:
                features[: min(written, rows)] = 1.0
            handle["coords"] = (
                grid(rows // 4 + 1, 4)[:rows] if rows <= 1000 else np.zeros((rows, 2), np.int32)
            )
        with h5py.File(path, "r") as handle:
            stored = handle["features"].id.get_storage_size()  # what the file really holds
        declared = rows * cols * 4
        tracemalloc.start()
        try:
            bag = load_bag(path)
            outcome = f"read {bag.n_instances}"
        except BagError as err:
            outcome = str(err)
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    if declared > max(64 << 20, 16 * stored):  # more than 16x what is stored: no real compression
        assert "refused before reading" in outcome, outcome
        assert peak < 16 << 20, (peak, outcome)
    else:
        assert peak < 2 * declared + (16 << 20), (peak, outcome)  # in proportion to the input


@fast(40)
@given(
    flag=st.sampled_from(["--dist-thr", "--patch-size"]),
    value=st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([0.0, -0.0, 1e-300, 64.0, 64.000001, 1e300, 2**0.5, 256.0]),
    ),
)
def test_flag_values_are_used_or_refused_as_usage_errors(model_path, flag, value):
    """Any float for --dist-thr / --patch-size: a usage error (exit 2, one line naming the flag)
    unless positive, finite (and <= 64 for --dist-thr); a valid one never crashes the run."""
    with tempfile.TemporaryDirectory() as tmp:
        bag = write_bag(Path(tmp) / "a.safetensors")
        result = invoke("score", bag, "-m", model_path, flag, repr(value), "-o", Path(tmp) / "out")
    valid = value > 0 and np.isfinite(value) and not (flag == "--dist-thr" and value > 64)
    if valid:
        assert result.exit_code in (0, 1), result.stderr  # 1: e.g. a graph far too dense for the bag
        assert all(line.startswith(f"error: {bag}: ") for line in error_lines(result.stderr))
    else:
        assert result.exit_code == 2, result.stderr
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {flag} "), lines


def _dense_bag(path: Path, side: int, step: int = PATCH, **metadata) -> Path:
    coords = grid(side, side, step)
    features = np.random.default_rng(0).normal(size=(len(coords), IN_DIM)).astype(np.float32)
    save_file(
        {"features": torch.from_numpy(features), "coords": torch.from_numpy(coords)},
        str(path),
        metadata={k: str(v) for k, v in metadata.items()} or None,
    )
    return path


@pytest.mark.slow
def test_the_worst_bad_inputs_cost_little_memory_and_time(tmp_path, model_path):
    """One real process over the inputs that used to take gigabytes: 100k patches with --dist-thr 30
    (the raster path had no neighbour cap: 10.8 GB), the same bag with a patch step 10x too large
    (6.4 GB), and h5 files declaring 2 GB and 19 GiB they do not store. Peak RSS, measured."""
    bags = tmp_path / "bags"
    bags.mkdir()
    _dense_bag(bags / "dense.safetensors", 317, patch_size=PATCH)  # 100,489 patches
    _dense_bag(bags / "step_10x.safetensors", 317, patch_size=PATCH * 10)
    for name, rows in (("declares_2gb.h5", 500_000), ("declares_19gib.h5", 5_000_000)):
        with h5py.File(bags / name, "w") as handle:
            handle.create_dataset("features", shape=(rows, 1024), dtype="f4", chunks=(1000, 1024))
            handle["coords"] = grid(5, 4)
    probe = (
        "import resource, subprocess, sys, time\n"
        "started = time.perf_counter()\n"
        "proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "print(proc.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
        "time.perf_counter() - started)\n"
        "sys.stderr.write(proc.stderr)\n"
    )
    command = [sys.executable, "-c", probe, sys.executable, "-m", "smcli", "score"]
    runs = {
        "--dist-thr 30": [*command, str(bags / "dense.safetensors"), "--dist-thr", "30"],
        "patch step 10x": [*command, str(bags / "step_10x.safetensors")],
        "declared h5": [*command, str(bags / "declares_2gb.h5"), str(bags / "declares_19gib.h5")],
    }
    for what, argv in runs.items():
        proc = subprocess.run(
            [*argv, "-m", str(model_path), "-o", str(tmp_path / "out")],
            capture_output=True,
            text=True,
            timeout=300,
        )
        code, rss_kib, seconds = proc.stdout.split()
        assert code == "1", (what, proc.stderr)
        errors = error_lines(proc.stderr)
        assert errors and all(line.startswith(f"error: {bags}/") for line in errors), proc.stderr
        print(f"{what}: peak RSS {int(rss_kib) / 1024:.0f} MiB, {float(seconds):.1f} s")
        assert int(rss_kib) < 1024 * 1024, f"{what}: peak RSS {int(rss_kib) / 1024:.0f} MiB"
        assert float(seconds) < 120


# ------------------------------------------------------------------------ §6 scripts and logs


def _smcli_process(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "smcli", *map(str, args)], stderr=subprocess.PIPE, text=True, **kwargs
    )


def test_a_full_disk_on_stdout_is_one_line_and_exit_1(tmp_path, model_path):
    bag = write_bag(tmp_path / "a.safetensors", patch_size=PATCH)
    with open("/dev/full", "w") as full:
        proc = _smcli_process("score", bag, "-m", model_path, stdout=full)
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert stderr == "error: stdout: cannot write (No space left on device)\n"


def test_a_reader_that_goes_away_ends_the_run_quietly_with_status_1(tmp_path, model_path):
    for i in range(3):
        write_bag(tmp_path / "bags" / f"b{i}.safetensors", n_rows=150, n_cols=150, seed=i, patch_size=PATCH)
    proc = _smcli_process("score", tmp_path / "bags", "-m", model_path, stdout=subprocess.PIPE)
    assert proc.stdout.readline().startswith("bag_id,instance,")
    proc.stdout.close()  # like `| head -1`
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in stderr and "error:" not in stderr and "Exception" not in stderr, stderr


def test_version_prints_without_importing_numpy_or_torch():
    probe = (
        "import sys\n"
        "sys.argv = ['smcli', '--version']\n"
        "from smcli.cli import main\n"
        "try:\n    main()\nexcept SystemExit as done:\n    code = done.code\n"
        "print(code, 'numpy' in sys.modules, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    from smcli import __version__

    assert out.stdout.splitlines() == [f"smcli {__version__}", "0 False False"], out.stderr
    script = Path(sys.executable).parent / "smcli"  # the console script pip installed beside python
    installed = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert installed.returncode == 0 and installed.stdout == f"smcli {__version__}\n"


def test_python_warnings_reach_stderr_as_one_line():
    probe = (
        "import warnings\nfrom smcli import cli\nwarnings.showwarning = cli._warning_line\n"
        "import numpy as np\nnp.float32(3e38) * np.float32(10)\n"
    )
    out = subprocess.run(
        [sys.executable, "-W", "always", "-c", probe], capture_output=True, text=True, timeout=60
    )
    assert out.stderr == "warning: RuntimeWarning: overflow encountered in scalar multiply\n"


STEP_CASES = st.tuples(
    st.sampled_from([1, 2, 4, 10]),  # the coords' real step, in patches of PATCH
    st.sampled_from(["flag", "metadata", "none"]),  # where smcli's patch step comes from
    st.sampled_from([PATCH // 2, PATCH, 2 * PATCH, 10 * PATCH]),  # the step given there
)


@fast(15)
@given(cases=st.lists(STEP_CASES, min_size=1, max_size=3))
def test_strict_fails_exactly_the_bags_a_normal_run_warns_about(model_path, cases):
    with tempfile.TemporaryDirectory() as tmp:
        flags: list[str] = []
        paths = []
        for index, (spacing, source, given_step) in enumerate(cases):
            metadata = {"patch_size": given_step} if source == "metadata" else {}
            paths.append(
                write_bag(
                    Path(tmp) / "bags" / f"b{index}.safetensors", 5, 5, index, PATCH * spacing, **metadata
                )
            )
            if source == "flag":
                flags = ["--patch-size", str(given_step)]  # one flag for the run: the last one wins
        normal = invoke("score", *paths, "-m", model_path, *flags, "-o", Path(tmp) / "normal")
        strict = invoke("score", *paths, "-m", model_path, *flags, "--strict", "-o", Path(tmp) / "strict")
        flagged = {
            line.split(": ")[1]
            for line in normal.stderr.splitlines()
            if line.startswith(("warning:", "note:"))
        }
        failed = {line.split(": ")[1] for line in error_lines(strict.stderr)}
        inferred = {
            str(p)
            for p, r in zip(paths, bags_rows(Path(tmp) / "normal" / "_bags.csv"), strict=True)
            if r["patch_step_source"] == "inferred"
        }
        assert failed == flagged | inferred, (normal.stderr, strict.stderr)
        assert strict.exit_code == (1 if failed else 0)
        assert all("--strict: " in line for line in error_lines(strict.stderr))


def test_paths_on_stdin_may_be_any_bytes(tmp_path, model_path):
    """`find ... | smcli score -`: a name that is not UTF-8 is that input's error, not a crash."""
    good = write_bag(tmp_path / "good.safetensors", patch_size=PATCH)
    odd = write_bag(Path(os.fsdecode(bytes(tmp_path) + b"/odd\xff.safetensors")), patch_size=PATCH)
    stdin = bytes(odd) + b"\n" + bytes(good) + b"\n"
    result = invoke("score", "-", "-m", model_path, "-o", tmp_path / "out", input=stdin)
    assert result.exit_code == 1
    assert error_lines(result.stderr) == [
        f"error: {tmp_path}/odd\\udcff.safetensors: the file name is not valid UTF-8: rename the file "
        "(bag ids are UTF-8)"
    ]
    assert (tmp_path / "out" / "good.csv").exists()


def test_a_bag_id_with_control_characters_is_no_file_name_but_fits_a_table(tmp_path, model_path):
    bag = write_bag(tmp_path / "a.safetensors", patch_size=PATCH, bag_id="line\nbreak")
    result = invoke("score", bag, "-m", model_path, "-o", tmp_path / "out")
    assert result.exit_code == 1
    assert error_lines(result.stderr) == [
        f"error: {bag}: bag_id 'line\\nbreak' cannot be used as a file name"
    ]
    assert [r["bag_id"] for r in bags_rows(tmp_path / "out" / "_bags.csv")] == ["line\\nbreak"]
    table = invoke("score", bag, "-m", model_path, "-o", tmp_path / "all.csv")
    assert table.exit_code == 0
    assert set(pd.read_csv(tmp_path / "all.csv")["bag_id"]) == {"line\nbreak"}
