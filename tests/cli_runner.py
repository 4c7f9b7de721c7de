"""The one in-process CLI runner the CLI tests share (no torch import)."""

from __future__ import annotations

from typer.testing import CliRunner

from smcli.cli import app

runner = CliRunner()


def invoke(*args):
    """Run `smcli ARGS...` in-process; a traceback or an exception other than an exit fails the test."""
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result
