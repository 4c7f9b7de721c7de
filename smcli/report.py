"""Render an EvaluationReport: the terminal table, report.json / report.csv / slides.csv, and the
ROC and precision-recall curves as PNG (matplotlib, one line per model). Files are written
atomically; an existing report is replaced only with overwrite.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from smcli.errors import OutputError, UsageError
from smcli.evaluate import EvaluationReport, ModelReport
from smcli.files import atomic_path
from smcli.stats import Estimate

REPORT_FILES = ("report.json", "report.csv", "slides.csv", "roc.png", "pr.png")
CSV_COLUMNS = ["model", "level", "metric", "value", "ci_low", "ci_high", "n", "n_positive"]


def _number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _with_interval(estimate: Estimate) -> str:
    """`0.884 [0.812, 0.951]`: the value and its 95 % bootstrap interval (a comma, not a dash,
    between the bounds, so negative bounds read unambiguously)."""
    if estimate.value is None:
        return "n/a"
    if estimate.low is None or estimate.high is None:
        return _number(estimate.value)
    return f"{_number(estimate.value)} [{_number(estimate.low)}, {_number(estimate.high)}]"


def _p_value(value: float | None) -> str:
    if value is None:
        return "n/a"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def table_sections(report: EvaluationReport) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) for each part of the table: bag level, instance level, comparisons."""
    bag_rows = []
    for model in report.models:
        if model.bag is None:
            continue
        bag = model.bag
        bag_rows.append(
            [
                model.name,
                f"{bag.n_slides} ({bag.n_positive}+)",
                _with_interval(bag.auroc),
                _with_interval(bag.average_precision),
                f"{bag.threshold:.3g}",
                _with_interval(bag.balanced_accuracy),
                _with_interval(bag.sensitivity),
                _with_interval(bag.specificity),
            ]
        )
    instance_rows = [
        [
            model.name,
            f"{model.instance.n_bags} ({model.instance.n_bags_both_classes} with lesions)",
            _with_interval(model.instance.per_bag_mean),
            _with_interval(model.instance.pooled),
        ]
        for model in report.models
        if model.instance is not None
    ]
    comparison_rows = [
        [
            f"{c.model_a} vs {c.model_b}",
            str(c.n_slides),
            _with_interval(c.difference),
            _p_value(c.p_value),
            str(c.n_bags),
            _with_interval(c.localization_difference),
            _p_value(c.localization_p_value),
        ]
        for c in report.comparisons
    ]
    sections = []
    if bag_rows:
        sections.append(
            (
                "bag level",
                ["model", "slides", "AUROC", "AP", "threshold", "bal. acc.", "sensitivity", "specificity"],
                bag_rows,
            )
        )
    if instance_rows:
        sections.append(
            ("instance level", ["model", "bags", "localization AUROC, mean per bag", "pooled"], instance_rows)
        )
    if comparison_rows:
        header = ["models", "slides", "ΔAUROC", "DeLong p", "bags", "Δ localization AUROC", "sign-flip p"]
        sections.append(("comparisons", header, comparison_rows))
    return sections


def markdown_table(report: EvaluationReport) -> str:
    """The table as Markdown (what goes to a file or pipe; pastes into a README as it is)."""
    lines: list[str] = []
    for title, header, rows in table_sections(report):
        if lines:
            lines.append("")
        lines.append(f"**{title}** (95% CI, {report.n_boot} bootstrap resamples, seed {report.seed}):")
        lines.append("")
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join("---" for _ in header) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def print_table(report: EvaluationReport, stream) -> None:
    """The table on `stream`: rich boxes on a terminal, Markdown otherwise."""
    if not (hasattr(stream, "isatty") and stream.isatty()):
        stream.write(markdown_table(report))
        stream.flush()
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(file=stream)
    for title, header, rows in table_sections(report):
        table = Table(title=f"{title} (95% CI, {report.n_boot} resamples, seed {report.seed})")
        for name in header:
            table.add_column(name, justify="left" if name in ("model", "models") else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)


def left_out_lines(report: EvaluationReport) -> list[str]:
    """One line per model and reason listing every slide left out (for stderr)."""
    lines = []
    for model in report.models:
        for reason, ids in model.left_out.items():
            lines.append(f"{model.name}: {len(ids)} slides {reason}: {', '.join(ids)}")
    return lines


def report_document(report: EvaluationReport) -> dict[str, Any]:
    """report.json: settings, per model its bag and instance levels and left-out slides, comparisons."""

    def level(obj) -> dict[str, Any] | None:
        if obj is None:
            return None
        return {k: v.as_dict() if isinstance(v, Estimate) else v for k, v in vars(obj).items()}

    def model_document(model: ModelReport) -> dict[str, Any]:
        return {
            "name": model.name,
            "directory": model.directory,
            "probability_column": model.probability_column,
            "bag_level": level(model.bag),
            "instance_level": level(model.instance),
            "left_out": model.left_out,
            "notes": model.notes,
            "slides": [
                {
                    "bag_id": s.bag_id,
                    "target": s.target,
                    "probability": s.probability,
                    "localization_auroc": s.localization_auroc,
                }
                for s in model.slides
            ],
        }

    return {
        "targets": report.targets,
        "n_boot": report.n_boot,
        "seed": report.seed,
        "confidence": 0.95,
        "complete": report.complete,
        "models": [model_document(m) for m in report.models],
        "comparisons": [
            {
                "model_a": c.model_a,
                "model_b": c.model_b,
                "n_slides": c.n_slides,
                "auroc_a": c.auroc_a,
                "auroc_b": c.auroc_b,
                "auroc_difference": c.difference.as_dict(),
                "delong_p": c.p_value,
                "n_bags": c.n_bags,
                "localization_auroc_difference": c.localization_difference.as_dict(),
                "localization_sign_flip_p": c.localization_p_value,
            }
            for c in report.comparisons
        ],
    }


def report_rows(report: EvaluationReport) -> list[list[Any]]:
    """report.csv: one row per model and metric (CSV_COLUMNS), comparisons as `A vs B` rows."""
    rows: list[list[Any]] = []
    for model in report.models:
        if model.bag is not None:
            bag = model.bag
            for metric in ("auroc", "average_precision", "balanced_accuracy", "sensitivity", "specificity"):
                estimate = getattr(bag, metric)
                rows.append(
                    [model.name, "bag", metric, estimate.value, estimate.low, estimate.high]
                    + [bag.n_slides, bag.n_positive]
                )
            rows.append(
                [model.name, "bag", "threshold", bag.threshold, None, None, bag.n_slides, bag.n_positive]
            )
        if model.instance is not None:
            inst = model.instance
            for metric, estimate, n, n_pos in (
                ("localization_auroc_mean", inst.per_bag_mean, inst.n_bags_both_classes, None),
                ("localization_auroc_pooled", inst.pooled, inst.n_instances, inst.n_positive_instances),
            ):
                rows.append(
                    [model.name, "instance", metric, estimate.value, estimate.low, estimate.high, n, n_pos]
                )
    for c in report.comparisons:
        name = f"{c.model_a} vs {c.model_b}"
        d = c.difference
        rows.append([name, "comparison", "auroc_difference", d.value, d.low, d.high, c.n_slides, None])
        rows.append([name, "comparison", "delong_p", c.p_value, None, None, c.n_slides, None])
        d = c.localization_difference
        rows.append(
            [name, "comparison", "localization_auroc_difference", d.value, d.low, d.high, c.n_bags, None]
        )
        rows.append(
            [
                name,
                "comparison",
                "localization_sign_flip_p",
                c.localization_p_value,
                None,
                None,
                c.n_bags,
                None,
            ]
        )
    return rows


def slide_rows(report: EvaluationReport) -> tuple[list[str], list[list[Any]]]:
    """slides.csv: one row per slide, each model's probability and localization AUROC side by side."""
    header = ["bag_id", "target"]
    for model in report.models:
        header += [f"probability_{model.name}", f"localization_auroc_{model.name}"]
    by_slide: dict[str, list[Any]] = {}
    for index, model in enumerate(report.models):
        for slide in model.slides:
            row = by_slide.setdefault(
                slide.bag_id, [slide.bag_id, slide.target] + [None] * (2 * len(report.models))
            )
            row[2 + 2 * index] = slide.probability
            row[3 + 2 * index] = slide.localization_auroc
    return header, [by_slide[key] for key in sorted(by_slide)]


def _csv_text(header: list[str], rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(
        [["" if v is None else repr(v) if isinstance(v, float) else v for v in row] for row in rows]
    )
    return buffer.getvalue()


def write_report(report: EvaluationReport, directory: Path, overwrite: bool = False) -> list[Path]:
    """Write report.json, report.csv, slides.csv, roc.png and pr.png into `directory`.

    Raises UsageError when a report is there already (without overwrite), OutputError on a failed write.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"{directory}: cannot create the report directory ({err.strerror})") from None
    existing = [name for name in REPORT_FILES if (directory / name).exists()]
    if existing and not overwrite:
        raise UsageError(f"{directory / existing[0]}: exists; pass --overwrite to replace the report")
    figures = curve_figures(report)  # before anything is written: a missing matplotlib writes nothing
    texts = {
        "report.json": json.dumps(report_document(report), indent=2) + "\n",
        "report.csv": _csv_text(CSV_COLUMNS, report_rows(report)),
        "slides.csv": _csv_text(*slide_rows(report)),
    }
    written = []
    try:
        for name, text in texts.items():
            with atomic_path(directory / name) as tmp:
                tmp.write_text(text, encoding="utf-8")
            written.append(directory / name)
        for name, figure in figures.items():
            with atomic_path(directory / name) as tmp:
                figure.savefig(tmp, format="png", dpi=120)
            written.append(directory / name)
    except OSError as err:
        raise OutputError(f"{directory}: cannot write the report ({err.strerror})") from None
    finally:
        for figure in figures.values():
            import matplotlib.pyplot as plt

            plt.close(figure)
    return written


def curve_figures(report: EvaluationReport) -> dict[str, Any]:
    """{'roc.png': Figure, 'pr.png': Figure}, one line per model with bag-level metrics."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError('the curves need matplotlib: pip install -e ".[eval]"') from None
    from smcli.stats import sklearn_metrics

    metrics = sklearn_metrics()
    roc, roc_axes = plt.subplots(figsize=(5.5, 5))
    pr, pr_axes = plt.subplots(figsize=(5.5, 5))
    roc_axes.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1, label="chance")
    drawn = [(model, model.bag) for model in report.models if model.bag is not None]
    for index, (model, bag) in enumerate(drawn):
        # wider lines first, so a later model's identical curve cannot hide an earlier one
        width = 1.5 + 1.5 * (len(drawn) - 1 - index)
        targets = [s.target for s in model.slides]
        scores = [s.probability for s in model.slides]
        fpr, tpr, _ = metrics.roc_curve(targets, scores)
        label = f"{model.name} (AUROC {_number(bag.auroc.value)})"
        roc_axes.plot(fpr, tpr, drawstyle="steps-post", linewidth=width, label=label)
        precision, recall, _ = metrics.precision_recall_curve(targets, scores)
        label = f"{model.name} (AP {_number(bag.average_precision.value)})"
        pr_axes.plot(recall, precision, drawstyle="steps-post", linewidth=width, label=label)
    for axes, title, xlabel, ylabel in (
        (
            roc_axes,
            "ROC, bag level",
            "1 − specificity (false positive rate)",
            "sensitivity (true positive rate)",
        ),
        (pr_axes, "Precision–recall, bag level", "recall (sensitivity)", "precision"),
    ):
        axes.set(title=title, xlabel=xlabel, ylabel=ylabel, xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
        axes.set_aspect("equal")
        axes.grid(color="0.9")
        axes.legend(loc="lower right" if axes is roc_axes else "lower left", fontsize=8)
    roc.tight_layout()
    pr.tight_layout()
    return {"roc.png": roc, "pr.png": pr}
