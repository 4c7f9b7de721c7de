"""smcli evaluate: the numbers (against scikit-learn), left-out slides, files, and every error."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics
from typer.testing import CliRunner

from smcli.cli import app
from smcli.evaluate import EvaluateRequest, evaluate
from smcli.metrics import auroc

runner = CliRunner()

TARGETS = {"s1": 1, "s2": 0, "s3": 1, "s4": 0, "s5": 1, "s6": 0, "s7": 0}


def invoke(*args):
    return runner.invoke(app, ["evaluate", *[str(a) for a in args]])


def write_targets(path: Path, targets: dict[str, int] = TARGETS, columns=("slide_id", "target")) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(targets.items())
    return path


def scored_dir(
    root: Path,
    name: str,
    probabilities: dict[str, float | None],
    seed: int = 0,
    status: dict[str, str] | None = None,
    extra: dict[str, dict[str, float]] | None = None,
    score_column: str = "attention_logit",
) -> Path:
    """A directory as `smcli score -o DIR` leaves it: per-bag tables (with labels; positives of a
    target-1 slide carry lesions) and `_bags.csv` with probability and the tables' auroc."""
    rng = np.random.default_rng(seed)
    directory = root / name
    directory.mkdir()
    rows = []
    for bag_id, probability in probabilities.items():
        n = 40
        labels = np.zeros(n, dtype=int)
        if TARGETS.get(bag_id) == 1:
            labels[:8] = 1
        logits = (labels * 1.0 + rng.standard_normal(n)).astype(np.float32)
        with open(directory / f"{bag_id}.csv", "w") as handle:
            handle.write(f"bag_id,instance,x,y,{score_column},attention_weight,label\n")
            for i in range(n):
                handle.write(f"{bag_id},{i},{i * 256},0,{float(logits[i])!r},0.025,{labels[i]}\n")
        value = auroc(logits, labels)
        row = {
            "bag_id": bag_id,
            "path": f"{bag_id}.safetensors",
            "n_instances": n,
            "probability": "" if probability is None else repr(probability),
            "status": (status or {}).get(bag_id, "ok"),
            "auroc": "" if value is None else repr(value),
        }
        row.update({k: repr(v) for k, v in (extra or {}).get(bag_id, {}).items()})
        rows.append(row)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(directory / "_bags.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)
    return directory


PROBS_A = {"s1": 0.9, "s2": 0.2, "s3": 0.6, "s4": 0.4, "s5": 0.3, "s6": 0.1, "s7": 0.7}
PROBS_B = {"s1": 0.8, "s2": 0.5, "s3": 0.4, "s4": 0.45, "s5": 0.6, "s6": 0.3, "s7": 0.2}


@pytest.fixture
def cohort(tmp_path):
    return (
        write_targets(tmp_path / "targets.csv"),
        scored_dir(tmp_path, "model_a", PROBS_A, seed=1),
        scored_dir(tmp_path, "model_b", PROBS_B, seed=2),
    )


def test_bag_level_numbers_are_scikit_learn_s(cohort):
    targets, a, b = cohort
    report = evaluate(EvaluateRequest([a, b], targets, n_boot=200, seed=5))
    labels = [TARGETS[s] for s in PROBS_A]
    model = report.models[0]
    assert model.name == "model_a" and report.complete
    assert model.bag.auroc.value == metrics.roc_auc_score(labels, list(PROBS_A.values()))
    assert model.bag.average_precision.value == metrics.average_precision_score(
        labels, list(PROBS_A.values())
    )
    # at 0.5: s1, s3 called (of positives s1 s3 s5), s7 called among negatives s2 s4 s6 s7
    assert model.bag.sensitivity.value == pytest.approx(2 / 3)
    assert model.bag.specificity.value == pytest.approx(3 / 4)
    assert model.bag.balanced_accuracy.value == pytest.approx((2 / 3 + 3 / 4) / 2)
    for estimate in (model.bag.auroc, model.bag.average_precision, model.bag.balanced_accuracy):
        assert estimate.low <= estimate.value <= estimate.high
    assert model.bag.auroc.low < model.bag.auroc.high  # seven slides: a wide interval
    again = evaluate(EvaluateRequest([a, b], targets, n_boot=200, seed=5))
    assert again.models[0].bag.auroc == model.bag.auroc  # seeded
    other = evaluate(EvaluateRequest([a, b], targets, n_boot=200, seed=6))
    assert other.models[0].bag.auroc.value == model.bag.auroc.value
    assert other.models[0].bag.auroc != model.bag.auroc


def test_instance_level_matches_bags_csv_and_pooled_scikit_learn(cohort):
    targets, a, _ = cohort
    report = evaluate(EvaluateRequest([a], targets, n_boot=100))
    instance = report.models[0].instance
    recorded = {}
    with open(a / "_bags.csv") as handle:
        for row in csv.DictReader(handle):
            if row["auroc"]:
                recorded[row["bag_id"]] = float(row["auroc"])
    assert instance.n_bags == 7 and instance.n_bags_both_classes == 3
    assert instance.per_bag_mean.value == pytest.approx(np.mean(list(recorded.values())), abs=1e-12)
    scores, labels = [], []
    for bag_id in PROBS_A:
        with open(a / f"{bag_id}.csv") as handle:
            for row in csv.DictReader(handle):
                scores.append(float(row["attention_logit"]))
                labels.append(int(row["label"]))
    assert instance.pooled.value == pytest.approx(metrics.roc_auc_score(labels, scores), abs=1e-12)
    assert instance.pooled.low <= instance.pooled.value <= instance.pooled.high


def test_comparison_delong_and_localization(cohort):
    targets, a, b = cohort
    report = evaluate(EvaluateRequest([a, b], targets, n_boot=100))
    (comparison,) = report.comparisons
    assert (comparison.model_a, comparison.model_b, comparison.n_slides) == ("model_a", "model_b", 7)
    assert comparison.difference.value == pytest.approx(comparison.auroc_a - comparison.auroc_b)
    assert 0 < comparison.p_value <= 1
    assert comparison.n_bags == 3 and comparison.localization_p_value is not None


def test_table_on_stdout_without_output_and_files_with_it(cohort, tmp_path):
    targets, a, b = cohort
    result = invoke(a, b, "--targets", targets, "--n-boot", "50")
    assert result.exit_code == 0, result.stderr
    assert "| model_a | 7 (3+) |" in result.stdout and "| model_a vs model_b | 7 |" in result.stdout
    assert result.stderr == ""
    out = tmp_path / "report"
    result = invoke(a, b, "--targets", targets, "--n-boot", "50", "-o", out)
    assert result.exit_code == 0 and result.stdout == ""
    assert "| model_a | 7 (3+) |" in result.stderr and "smcli: wrote" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "pr.png",
        "report.csv",
        "report.json",
        "roc.png",
        "slides.csv",
    ]
    assert (out / "roc.png").read_bytes().startswith(b"\x89PNG")
    document = json.loads((out / "report.json").read_text())
    assert document["complete"] and document["n_boot"] == 50
    assert [m["name"] for m in document["models"]] == ["model_a", "model_b"]
    with open(out / "report.csv") as handle:
        rows = list(csv.DictReader(handle))
    auroc_row = next(r for r in rows if r["model"] == "model_a" and r["metric"] == "auroc")
    assert float(auroc_row["value"]) == document["models"][0]["bag_level"]["auroc"]["value"]
    assert {r["metric"] for r in rows if r["level"] == "comparison"} == {
        "auroc_difference",
        "delong_p",
        "localization_auroc_difference",
        "localization_sign_flip_p",
    }
    with open(out / "slides.csv") as handle:
        slides = list(csv.DictReader(handle))
    assert [s["bag_id"] for s in slides] == sorted(PROBS_A)
    assert float(slides[0]["probability_model_b"]) == PROBS_B["s1"]
    again = invoke(a, "--targets", targets, "--n-boot", "5", "-o", out)
    assert again.exit_code == 2
    assert again.stderr == f"error: {out / 'report.json'}: exists; pass --overwrite to replace the report\n"
    assert invoke(a, "--targets", targets, "--n-boot", "5", "-o", out, "--overwrite", "-q").exit_code == 0


def test_json_on_stdout(cohort):
    targets, a, _ = cohort
    result = invoke(a, "--targets", targets, "--n-boot", "0", "--json")
    assert result.exit_code == 0
    document = json.loads(result.stdout)
    assert document["models"][0]["bag_level"]["auroc"]["ci_low"] is None  # no resamples, no interval


def test_left_out_slides_are_listed_and_exit_1(tmp_path):
    targets = write_targets(tmp_path / "t.csv", {**TARGETS, "s8": 1})  # s8 never scored
    probabilities = {**PROBS_A, "extra": 0.5}  # scored, but not in targets
    a = scored_dir(tmp_path, "a", probabilities, status={"s6": "error"})
    (a / "s5.csv").unlink()  # the row says ok, the file is gone
    result = invoke(a, "--targets", targets, "--n-boot", "20", "--json")
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert "warning: a: 1 slides not in targets: extra" in lines
    assert "warning: a: 2 slides missing from outputs: s5, s8" in lines
    assert "warning: a: 1 slides failed in scoring: s6" in lines
    document = json.loads(result.stdout)
    assert document["complete"] is False
    assert document["models"][0]["bag_level"]["n_slides"] == 5
    assert document["models"][0]["left_out"]["missing from outputs"] == ["s5", "s8"]


def test_threshold_options(cohort, tmp_path):
    targets, a, b = cohort
    fixed = evaluate(EvaluateRequest([a], targets, threshold=0.25, n_boot=0)).models[0].bag
    assert fixed.threshold == 0.25 and fixed.sensitivity.value == 1.0 and fixed.specificity.value == 0.5
    validation = scored_dir(tmp_path, "validation", {"s1": 0.35, "s2": 0.3, "s3": 0.5, "s4": 0.1})
    chosen = evaluate(EvaluateRequest([a], targets, threshold_from=[validation], n_boot=0)).models[0].bag
    assert chosen.threshold == 0.35 and chosen.threshold_source == f"Youden's J on {validation}"


def test_ensemble_by_default_and_one_member_with_model(tmp_path):
    """An ensemble directory: its combined figures, or with --model one member's, which equal that
    model's own run."""
    root = Path(__file__).resolve().parent.parent
    sm, abmil = (root / f"sample_bags/models/{n}.safetensors" for n in ("sm_abmil", "abmil"))
    bags = [root / f"sample_bags/slide_0{i}.safetensors" for i in range(1, 9)]
    for name, models in (("ens", [sm, abmil]), ("abmil", [abmil])):
        args = [str(a) for m in models for a in ("-m", m)]
        result = runner.invoke(app, ["score", *map(str, bags), *args, "-o", str(tmp_path / name), "-q"])
        assert result.exit_code == 0, result.stderr
    targets = root / "sample_bags/targets.csv"
    combined = evaluate(EvaluateRequest([tmp_path / "ens"], targets, n_boot=0)).models[0]
    member = evaluate(EvaluateRequest([tmp_path / "ens"], targets, n_boot=0, model="abmil")).models[0]
    alone = evaluate(EvaluateRequest([tmp_path / "abmil"], targets, n_boot=0)).models[0]
    assert member.bag == alone.bag and member.instance.per_bag_mean == alone.instance.per_bag_mean
    assert member.instance.pooled == alone.instance.pooled
    assert member.instance.score_column == "attention_logit_abmil"
    assert combined.instance.score_column == "attention_logit"
    assert combined.instance.per_bag_mean != alone.instance.per_bag_mean
    result = invoke(tmp_path / "ens", "--targets", targets, "--model", "second")
    assert result.exit_code == 2
    assert (
        result.stderr
        == f"error: {tmp_path / 'ens'}: no model 'second' in _bags.csv (models: sm_abmil, abmil)\n"
    )


def test_top_k_tables_are_not_used_for_localization(cohort):
    targets, a, _ = cohort
    with open(a / "s1.csv") as handle:
        lines = handle.readlines()
    (a / "s1.csv").write_text("".join(lines[:6]))
    report = evaluate(EvaluateRequest([a], targets, n_boot=0))
    assert report.models[0].instance.n_bags == 6
    assert any("s1.csv: 5 of 40 patches (a --top-k table)" in note for note in report.models[0].notes)


def test_a_table_that_disagrees_with_bags_csv_is_an_error(cohort):
    targets, a, _ = cohort
    text = (a / "s3.csv").read_text().replace(",1\n", ",0\n", 3)  # relabel three positives
    (a / "s3.csv").write_text(text)
    result = invoke(a, "--targets", targets)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {a / 's3.csv'}: localization AUROC ")
    assert result.stderr.endswith("the table and _bags.csv disagree; score the bag again\n")
    assert len(result.stderr.splitlines()) == 1


def test_directory_names_are_made_unique_by_position(tmp_path):
    targets = write_targets(tmp_path / "t.csv")
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    first = scored_dir(tmp_path / "x", "scores", PROBS_A)
    second = scored_dir(tmp_path / "y", "scores", PROBS_B)
    report = evaluate(EvaluateRequest([first, second], targets, n_boot=0))
    assert [m.name for m in report.models] == ["scores#1", "scores#2"]


def test_shard_bags_files_are_read_together(tmp_path):
    targets = write_targets(tmp_path / "t.csv")
    d = scored_dir(tmp_path, "sharded", PROBS_A)
    rows = (d / "_bags.csv").read_text().splitlines(keepends=True)
    (d / "_bags.shard-1-of-2.csv").write_text("".join(rows[:4]))
    (d / "_bags.shard-2-of-2.csv").write_text(rows[0] + "".join(rows[4:]))
    (d / "_bags.csv").unlink()
    assert evaluate(EvaluateRequest([d], targets, n_boot=0)).models[0].bag.n_slides == 7


def test_errors_are_one_line_with_exit_2(cohort, tmp_path):
    targets, a, b = cohort
    no_bags = tmp_path / "empty"
    no_bags.mkdir()
    write_targets(tmp_path / "named.csv", columns=("case", "label"))
    (tmp_path / "bad.csv").write_text("slide_id,target\ns1,1\ns2,yes\n")
    (tmp_path / "twice.csv").write_text("slide_id,target\ns1,1\ns1,0\n")
    (tmp_path / "blank.csv").write_text("slide_id,target\n")
    write_targets(tmp_path / "positive.csv", {k: 1 for k in TARGETS})
    write_targets(tmp_path / "other.csv", {"zz": 1, "yy": 0})
    cases = [
        ((tmp_path / "nope", "--targets", targets), f"{tmp_path / 'nope'}: no such directory"),
        ((targets, "--targets", targets), f"{targets}: not a directory"),
        ((no_bags, "--targets", targets), f"{no_bags}: no _bags.csv"),
        ((a, "--targets", tmp_path / "missing.csv"), f"{tmp_path / 'missing.csv'}: no such targets file"),
        (
            (a, "--targets", tmp_path / "named.csv"),
            f"{tmp_path / 'named.csv'}: no column 'slide_id' (--id-column); columns: case, label",
        ),
        ((a, "--targets", tmp_path / "bad.csv"), "line 3: target must be 0 or 1, got 'yes'"),
        ((a, "--targets", tmp_path / "twice.csv"), "line 3: slide 's1' is listed twice"),
        ((a, "--targets", tmp_path / "blank.csv"), "no slides in the targets file"),
        ((a, "--targets", tmp_path / "positive.csv"), "need positive and negative slides"),
        ((a, "--targets", tmp_path / "other.csv"), "need positive and negative slides (no slides)"),
        ((a, "--targets", targets, "--n-boot", "-1"), "--n-boot must be between 0 and 100000, got -1"),
        ((a, "--targets", targets, "--threshold", "1.5"), "--threshold must be a probability in [0, 1]"),
        ((a, "--targets", targets, "--threshold", "0.3", "--threshold-from", b), "exclude each other"),
        ((a, b, "--targets", targets, "--threshold-from", b), "--threshold-from given 1 times for 2"),
        (
            (a, "--targets", targets, "--model", "m"),
            "no model 'm' in _bags.csv (models: none: not an ensemble)",
        ),
    ]
    cases += [
        (
            (a, "--targets", targets, "--n-boot", "100001"),
            "--n-boot must be between 0 and 100000, got 100001",
        ),
        ((a, "--targets", targets, "-o", targets), f"{targets}: cannot create the report directory"),
    ]
    for args, message in cases:
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.stderr)
        assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: "), result.stderr
        assert message in result.stderr, (message, result.stderr)
    named = invoke(a, "--targets", tmp_path / "named.csv", "--id-column", "case", "--target-column", "label")
    assert named.exit_code == 0


def test_sample_cohort_end_to_end(tmp_path):
    """Scored by `smcli score`, evaluated: the per-bag mean is _bags.csv's auroc column's mean."""
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "sm_abmil"
    scored = runner.invoke(
        app,
        ["score", str(root / "sample_bags"), "-m", str(root / "sample_bags/models/sm_abmil.safetensors")]
        + ["-o", str(out), "--device", "cpu", "-q"],
    )
    assert scored.exit_code == 0, scored.stderr
    report = evaluate(EvaluateRequest([out], root / "sample_bags/targets.csv", n_boot=20))
    with open(out / "_bags.csv") as handle:
        recorded = [float(r["auroc"]) for r in csv.DictReader(handle) if r["auroc"]]
    assert report.complete and report.models[0].bag.n_slides == 8
    assert report.models[0].instance.per_bag_mean.value == pytest.approx(np.mean(recorded), abs=1e-12)


def test_rich_table_on_a_terminal(cohort):
    import io

    from smcli.report import print_table

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    targets, a, b = cohort
    stream = Terminal()
    print_table(evaluate(EvaluateRequest([a, b], targets, n_boot=10)), stream)
    text = stream.getvalue()
    assert "model_a" in text and "DeLong p" in text and "| model_a |" not in text  # boxes, not Markdown


@pytest.mark.parametrize("flags", [[], ["--json"]])
def test_a_full_device_on_stdout_is_one_line_and_exit_1(cohort, flags):
    targets, model_a, model_b = cohort
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "smcli", "evaluate", str(model_a), str(model_b)]
            + ["--targets", str(targets), "--n-boot", "50", *flags],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
        )
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == ["error: stdout: cannot write (No space left on device)"]
