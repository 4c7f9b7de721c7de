"""`smcli view` as a user runs it: the URL first on stdout, a clean stop on SIGINT/SIGTERM (exit 0),
one-line errors before anything is served."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from typer.testing import CliRunner

from smcli.cli import app
from tests.view_support import patch_coords, write_slide, write_table

runner = CliRunner()


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    folder = tmp_path_factory.mktemp("viewcli")
    write_table(folder / "slide_a.csv", patch_coords(), seed=1)
    return folder / "slide_a.csv"


def launch(*args) -> tuple[subprocess.Popen, str]:
    """smcli view in a subprocess; returns it and the first line it printed."""
    command = [sys.executable, "-m", "smcli", "view", *map(str, args), "--no-browser"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    url = process.stdout.readline().strip()
    return process, url


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_url_first_then_a_clean_stop_on_a_signal(table, stop):
    process, url = launch(table)
    try:
        assert url.startswith("http://127.0.0.1:") and "?token=" in url
        with urllib.request.urlopen(url, timeout=20) as response:
            assert response.status == 200
        process.send_signal(stop)
        out, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert out == "" and "Traceback" not in err
    with pytest.raises(urllib.error.URLError):  # the port is closed
        urllib.request.urlopen(url, timeout=2)


def test_a_url_that_cannot_be_printed_is_one_line_and_exit_1(table):
    """The URL is the command's data: on a full stdout it is an error, never a server no one can find."""
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "smcli", "view", str(table), "--no-browser", "--port", "0"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == ["error: stdout: cannot write (No space left on device)"]


def test_other_host_warns_and_allow_host_names_are_accepted(table):
    process, url = launch(table, "--host", "127.0.0.2", "--allow-host", "viewer.lab")
    try:
        assert url.startswith("http://127.0.0.2:")
        request = urllib.request.Request(url, headers={"Host": "viewer.lab"})
        with urllib.request.urlopen(request, timeout=20) as response:
            assert response.status == 200
        request = urllib.request.Request(url, headers={"Host": "other.lab"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=20)
        assert refused.value.code == 403
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
    assert "warning: listening on 127.0.0.2" in err


def test_a_slide_given_as_a_symlink_is_served(tmp_path, table):
    slide = write_slide(tmp_path / "real.tiff", patch_coords())
    (tmp_path / "slides").mkdir()
    os.symlink(slide, tmp_path / "slides" / "slide_a.tiff")
    process, url = launch(table, "--slide", tmp_path / "slides")
    try:
        base = url.split("?")[0]
        token = url.split("token=")[1]
        tile = f"{base}api/bags/0/slide/11/4_3.jpeg?token={token}"
        with urllib.request.urlopen(tile, timeout=20) as response:
            assert response.status == 200 and response.headers["Content-Type"] == "image/jpeg"
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["missing.csv"], 2, "missing.csv: no such file or directory"),
        (["{table}", "--slide", "nowhere.tiff"], 2, "nowhere.tiff: no such slide file or directory"),
        (["{table}", "--port", "70000"], 2, "--port must be in 0..65535"),
        (["{table}", "--slide", "{table}"], 1, "cannot read as a slide"),
        (["{table}", "--column", "nope"], 2, "no column 'nope'"),
        (["{table}", "--vmin", "0", "--vmax", "1"], 2, "add --norm raw"),
        (["{table}", "--cmap", "nope"], 2, "unknown --cmap 'nope'"),
        (["{table}", "--mpp", "-1"], 2, "--mpp must be a positive number"),
    ],
)
def test_errors_are_one_line_with_their_exit_code(table, args, code, message):
    result = runner.invoke(app, ["view", *[a.format(table=table) for a in args], "--no-browser"])
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert message in lines[0] and all(line.startswith("error: ") for line in lines)
    assert len(lines) == 1 or lines[1] == "error: no bag to show"
    assert result.stdout == ""


def test_a_busy_port_is_a_usage_error(table):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        result = runner.invoke(app, ["view", str(table), "--port", str(port), "--no-browser"])
    assert result.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert time.monotonic() - started < 30
