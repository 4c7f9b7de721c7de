"""smcli.files: atomic writes, and stdout that gets every byte or says why not (issue 16, step 1).

The subprocess tests run the real `python -m smcli` with stdout on a full device, under
`ulimit -f` (RLIMIT_FSIZE: the kernel cuts the write short, silently, the case to catch), on a
pipe whose reader goes away, and on a tiny tmpfs (root only; skipped where it cannot be mounted).
"""

from __future__ import annotations

import errno
import importlib.util
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from smcli import files
from smcli.errors import OutputError, StdoutClosed
from tests.cli_runner import invoke

ORACLE = all(importlib.util.find_spec(name) is not None for name in ("torch", "torchmil"))
needs_oracle = pytest.mark.skipif(not ORACLE, reason="convert reads a torchmil .pt file")

ROOT = Path(__file__).resolve().parent.parent
BAGS = ROOT / "sample_bags"
MODEL = BAGS / "models" / "sm_abmil.safetensors"
SLIDE_01 = BAGS / "slide_01.safetensors"


def smcli(*args, stdout, preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "smcli", *map(str, args)],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=300,
        preexec_fn=preexec_fn,
    )


def file_size_limit(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


# ------------------------------------------------------------------------------- the write loop


def test_short_writes_are_followed_by_writes_of_the_rest():
    delivered = bytearray()

    def stingy(chunk) -> int:  # like a pipe or a file near its limit: a few bytes at a time
        taken = bytes(chunk[:7])
        delivered.extend(taken)
        return len(taken)

    data = bytes(range(256)) * 40
    files._write_all(stingy, data)
    assert bytes(delivered) == data


def test_a_write_that_makes_no_progress_is_an_error_not_a_spin():
    with pytest.raises(OSError) as caught:
        files._write_all(lambda chunk: 0, b"abc")
    assert caught.value.errno == errno.EIO


def test_write_stdout_names_stdout_and_the_reason(monkeypatch):
    def refuse(fd, chunk):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with tempfile.TemporaryFile() as sink:
        monkeypatch.setattr(sys, "stdout", open(sink.fileno(), "w", closefd=False))
        monkeypatch.setattr(os, "write", refuse)
        with pytest.raises(OutputError, match=r"^stdout: cannot write \(No space left on device\)$"):
            files.write_stdout(b"x")

        def broken(fd, chunk):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

        monkeypatch.setattr(os, "write", broken)
        with pytest.raises(StdoutClosed):
            files.write_stdout(b"x")


# ------------------------------------------------------------------------- every stdout writer

STDOUT_WRITERS = {
    "score": ["score", SLIDE_01, "-m", MODEL],
    "inspect": ["inspect", SLIDE_01],
    "inspect --json": ["inspect", "--json", SLIDE_01],
    "inspect a checkpoint": ["inspect", MODEL],
    "--version": ["--version"],
}


@pytest.mark.parametrize("name", STDOUT_WRITERS)
def test_a_full_device_on_stdout_is_one_line_and_exit_1(name):
    with open("/dev/full", "w") as full:
        done = smcli(*STDOUT_WRITERS[name], stdout=full)
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if not line.startswith("smcli:")]
    assert errors == ["error: stdout: cannot write (No space left on device)"], done.stderr


@pytest.mark.parametrize("name", ["score", "inspect", "inspect --json"])
def test_a_file_size_limit_that_cuts_a_write_short_is_an_error(tmp_path, name):
    """RLIMIT_FSIZE: the kernel writes what fits and returns a short count, then EFBIG."""
    limit = 200  # inside the first block of every writer's output
    with open(tmp_path / "out", "w") as out:
        done = smcli(*STDOUT_WRITERS[name], stdout=out, preexec_fn=file_size_limit(limit))
    assert done.returncode == 1, done.stderr
    assert "error: stdout: cannot write (File too large)" in done.stderr.splitlines(), done.stderr
    assert "Traceback" not in done.stderr
    assert " 0 failed" not in done.stderr  # never "1 ok" for a table that did not arrive
    assert (tmp_path / "out").stat().st_size == limit


def test_a_score_table_that_fits_the_limit_is_whole_and_exit_0(tmp_path):
    with open(tmp_path / "out", "w") as out:
        done = smcli(*STDOUT_WRITERS["score"], stdout=out, preexec_fn=file_size_limit(10 << 20))
    assert done.returncode == 0, done.stderr
    unlimited = smcli(*STDOUT_WRITERS["score"], stdout=subprocess.PIPE)
    assert (tmp_path / "out").read_text() == unlimited.stdout


@pytest.mark.parametrize("delay", [0.0, 0.5])
def test_a_pipe_whose_reader_goes_away_ends_quietly_with_status_1(delay):
    proc = subprocess.Popen(
        [sys.executable, "-m", "smcli", "score", BAGS, "-m", MODEL],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    head = proc.stdout.read(100)  # like `| head -c 100`
    time.sleep(delay)  # a reader that closes a moment later
    proc.stdout.close()
    _, stderr = proc.communicate(timeout=300)
    assert head.startswith("bag_id,instance,")
    assert proc.returncode == 1, stderr
    assert "Traceback" not in stderr and "error" not in stderr and " ok," not in stderr, stderr


@pytest.fixture
def tiny_tmpfs():
    """A 64 KiB tmpfs (mounting needs root and a kernel that allows it; otherwise skipped)."""
    mount_point = Path(tempfile.mkdtemp(prefix="smcli-tmpfs-"))
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        mount_point.rmdir()
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)
        mount_point.rmdir()


def test_a_nearly_full_disk_on_stdout_is_an_error_not_a_cut_table(tiny_tmpfs):
    with open(tiny_tmpfs / "scores.csv", "w") as out:  # its table is ~96 kB
        done = smcli("score", SLIDE_01, "-m", MODEL, stdout=out)
    assert done.returncode == 1, done.stderr
    assert "error: stdout: cannot write (No space left on device)" in done.stderr.splitlines()
    assert "Traceback" not in done.stderr


# --------------------------------------------------------- one output rule for every command



@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A scores table of slide_01 (for heatmap/geojson) and, where the torchmil oracle is installed,
    a torchmil training file (for convert)."""
    folder = tmp_path_factory.mktemp("inputs")
    table = folder / "slide_01.csv"
    assert invoke("score", SLIDE_01, "-m", MODEL, "-o", table).exit_code == 0
    if not ORACLE:  # the torch-free CI venv
        return {"table": table}
    import torch
    from torchmil.nn import SmAttentionPool

    torch.manual_seed(0)
    pt = folder / "pool.pt"
    torch.save(SmAttentionPool(8, 4).state_dict(), pt)
    return {"table": table, "pt": pt}


WRITERS = {  # command -> (arguments before -o, output file name)
    "score": (lambda given: ["score", SLIDE_01, "-m", MODEL], "scores.csv"),
    "score parquet": (lambda given: ["score", SLIDE_01, "-m", MODEL], "scores.parquet"),
    "convert-bag": (lambda given: ["convert-bag", SLIDE_01], "bag.safetensors"),
    "heatmap": (lambda given: ["heatmap", given["table"]], "map.png"),
    "geojson": (lambda given: ["geojson", given["table"]], "tiles.geojson"),
    "convert": (lambda given: ["convert", given["pt"], *CONVERT_FLAGS], "model.safetensors"),
}
CONVERT_FLAGS = ["--assume-defaults"]


@pytest.mark.parametrize(
    "command", [pytest.param(name, marks=needs_oracle) if name == "convert" else name for name in WRITERS]
)
def test_every_writer_creates_a_missing_parent_and_refuses_an_existing_output(tmp_path, inputs, command):
    arguments, name = WRITERS[command]
    out = tmp_path / "not" / "yet" / name
    first = invoke(*arguments(inputs), "-o", out)
    assert first.exit_code == 0, first.stderr
    assert out.is_file()
    out.write_bytes(b"precious")
    again = invoke(*arguments(inputs), "-o", out)
    assert again.exit_code in (1, 2)
    errors = [line for line in again.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {out}: output exists; pass --overwrite to replace it"], again.stderr
    assert out.read_bytes() == b"precious"
    replaced = invoke(*arguments(inputs), "-o", out, "--overwrite")
    assert replaced.exit_code == 0, replaced.stderr
    assert out.read_bytes() != b"precious"


def test_a_directory_output_is_created_with_its_parents(tmp_path):
    out = tmp_path / "a" / "b" / "scores"
    assert invoke("score", SLIDE_01, "-m", MODEL, "-o", out).exit_code == 0
    assert sorted(p.name for p in out.iterdir() if p.name[0] != ".") == ["_bags.csv", "slide_01.csv"]


def test_atomic_path_syncs_the_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync " + ("dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file"))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    with files.atomic_path(tmp_path / "out.txt") as tmp:
        tmp.write_text("every byte")
    assert events == ["fsync file", "rename", "fsync dir"]
    assert (tmp_path / "out.txt").read_text() == "every byte"
