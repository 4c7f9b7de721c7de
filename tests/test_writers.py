"""smcli.writers' directory output: every `_bags.csv` row describes the file on disk (issue 16).

Each per-bag file carries its own provenance (parquet key-value metadata; a CSV a hidden
`.<name>.smcli.json` sidecar naming the CSV's sha256). `--skip-existing` trusts only that, a run's
rows never contradict files another run wrote, and a shard run's rows replace the main file's.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from smcli.files import read_provenance
from smcli.scored import read_table
from tests.cli_runner import invoke

ROOT = Path(__file__).resolve().parent.parent
BAGS = ROOT / "sample_bags"
M1 = BAGS / "models" / "sm_abmil.safetensors"
M2 = BAGS / "models" / "abmil.safetensors"



def sha(model: Path) -> str:
    import hashlib

    return hashlib.sha256(model.read_bytes()).hexdigest()


def all_rows(out: Path) -> list[dict[str, str]]:
    rows = []
    for path in sorted(out.glob("_bags*.csv")):
        with open(path, newline="") as handle:
            rows += list(csv.DictReader(handle))
    return rows


def assert_rows_match_files(out: Path, fmt: str = "csv") -> None:
    """Every kept row, in every bags file, names the model and figures its file's provenance holds."""
    seen = set()
    for row in all_rows(out):
        if row["status"] not in ("ok", "skipped"):
            continue
        assert row["bag_id"] not in seen, f"two rows describe {row['bag_id']}"
        seen.add(row["bag_id"])
        made = read_provenance(out / f"{row['bag_id']}.{fmt}")
        assert made is not None, row["bag_id"]
        assert row["model_sha256"] == made["smcli.model_sha256"], row["bag_id"]
        assert row["dist_thr"] == made["smcli.dist_thr"], row["bag_id"]
        assert row["probability"] == made["smcli.probability"], row["bag_id"]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_every_file_carries_its_own_provenance(tmp_path, fmt):
    out = tmp_path / "out"
    assert invoke("score", BAGS, "-m", M1, "-o", out, "--format", fmt).exit_code == 0
    made = read_provenance(out / f"slide_01.{fmt}")
    assert made is not None
    assert made["smcli.model_sha256"] == sha(M1)
    assert made["smcli.smcli_version"] and made["smcli.patch_step"] and made["smcli.dist_thr"]
    assert '"dist_thr"' in made["smcli.options"] and '"top_k"' in made["smcli.options"]
    assert_rows_match_files(out, fmt)


def test_a_csv_sidecar_that_does_not_match_the_csv_is_no_provenance(tmp_path):
    out = tmp_path / "out"
    assert invoke("score", BAGS / "slide_01.safetensors", "-m", M1, "-o", out).exit_code == 0
    table = out / "slide_01.csv"
    assert read_provenance(table) is not None
    with open(table, "a") as handle:
        handle.write("slide_01,999,0,0,0.0,0.0\n")
    assert read_provenance(table) is None


def test_shard_overwrite_then_skip_existing_never_keeps_another_models_numbers(tmp_path):
    out = tmp_path / "out"
    assert invoke("score", BAGS, "-m", M1, "-o", out).exit_code == 0
    assert invoke("score", BAGS, "-m", M2, "-o", out, "--overwrite", "--shard", "1/1").exit_code == 0
    assert_rows_match_files(out)  # the main _bags.csv no longer claims M1 for M2's files
    resumed = invoke("score", BAGS, "-m", M1, "-o", out, "--skip-existing")
    assert resumed.exit_code == 0, resumed.stderr
    assert "8 ok, 0 skipped" in resumed.stderr  # M2's files are rescored, not kept as M1's
    assert_rows_match_files(out)
    for row in all_rows(out):
        assert row["model_sha256"] == sha(M1)
    again = invoke("score", BAGS, "-m", M1, "-o", out, "--skip-existing")
    assert "0 ok, 8 skipped" in again.stderr
    assert_rows_match_files(out)


def test_a_resume_with_another_dist_thr_rescores(tmp_path):
    out = tmp_path / "out"
    assert invoke("score", BAGS, "-m", M1, "-o", out).exit_code == 0
    resumed = invoke("score", BAGS, "-m", M1, "-o", out, "--skip-existing", "--dist-thr", "1.0")
    assert "8 ok, 0 skipped" in resumed.stderr, resumed.stderr
    for row in all_rows(out):
        assert float(row["dist_thr"]) == 1.0
    assert_rows_match_files(out)
    same = invoke("score", BAGS, "-m", M1, "-o", out, "--skip-existing", "--dist-thr", "1.0")
    assert "0 ok, 8 skipped" in same.stderr, same.stderr


def test_two_runs_with_different_models_on_one_directory_leave_no_contradicting_row(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "smcli", "score", str(BAGS), "-o", str(out), "--overwrite", "-q"]
    for _ in range(2):
        runs = [subprocess.Popen([*command, "-m", str(model)]) for model in (M1, M2)]
        assert [run.wait(timeout=300) for run in runs] == [0, 0]
        assert_rows_match_files(out)
        assert len([r for r in all_rows(out) if r["status"] == "ok"]) == 8


def test_heatmap_takes_the_probability_from_the_file_not_a_stale_row(tmp_path):
    out = tmp_path / "out"
    assert invoke("score", BAGS / "slide_01.safetensors", "-m", M1, "-o", out).exit_code == 0
    bags_file = out / "_bags.csv"
    rows = list(csv.DictReader(open(bags_file, newline="")))
    truth = float(rows[0]["probability"])
    rows[0]["probability"] = "0.5"  # a row gone stale (as an older smcli left them)
    with open(bags_file, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (bag,) = read_table(out / "slide_01.csv", "attention_logit", None)
    assert bag.probability == truth
