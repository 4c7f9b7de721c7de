"""`smcli evaluate`: how good are scored directories against slide targets, and is A better than B?

Inputs are what `smcli score -o DIR` wrote: `_bags.csv` (a probability per bag; shard files
`_bags.shard-K-of-N.csv` are read together) and, for the instance level, the per-bag tables with a
`label` column. Targets are a CSV of slide id -> 0/1, matched to `bag_id` (the bag's file stem).
Everything here returns data (an EvaluationReport); rendering and files are smcli/report.py's.
Slides are never dropped silently: every slide left out is listed with the reason.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from smcli import stats
from smcli.errors import UsageError, printable
from smcli.stats import Estimate

KEPT_STATUSES = ("ok", "skipped")  # _bags.csv rows that describe an output file
MAX_BOOT = 100_000  # the resample indices are held as (n_boot, slides): bounded memory
AUROC_AGREEMENT = 1e-9  # a table's localization AUROC vs its _bags.csv `auroc` cell


@dataclass(frozen=True)
class EvaluateRequest:
    """Everything `smcli evaluate` was asked to do."""

    directories: list[Path]
    targets: Path
    id_column: str = "slide_id"
    target_column: str = "target"
    threshold: float | None = None  # None: 0.5 unless threshold_from is given
    threshold_from: list[Path] = field(default_factory=list)  # one per directory (Youden's J there)
    n_boot: int = 1000
    seed: int = 0
    model: str | None = None  # an ensemble member's columns instead of the ensemble's


@dataclass
class ScoredSlide:
    """One slide of one directory: its bag probability and, with labels, its instance scores."""

    bag_id: str
    target: int
    probability: float | None
    localization_auroc: float | None = None  # from the per-bag table; None without both classes
    positives: np.ndarray | None = None  # (P,) instance scores of label-1 patches
    negatives: np.ndarray | None = None  # (N,) instance scores of label-0 patches


@dataclass
class BagLevel:
    n_slides: int
    n_positive: int
    threshold: float
    threshold_source: str
    auroc: Estimate
    average_precision: Estimate
    balanced_accuracy: Estimate
    sensitivity: Estimate
    specificity: Estimate


@dataclass
class InstanceLevel:
    score_column: str
    n_bags: int  # bags with instance labels
    n_bags_both_classes: int  # bags entering the per-bag mean
    n_instances: int
    n_positive_instances: int
    per_bag_mean: Estimate
    pooled: Estimate


@dataclass
class ModelReport:
    name: str
    directory: str
    probability_column: str
    slides: list[ScoredSlide]
    bag: BagLevel | None
    instance: InstanceLevel | None
    left_out: dict[str, list[str]]  # reason -> bag ids
    notes: list[str] = field(default_factory=list)


@dataclass
class Comparison:
    model_a: str
    model_b: str
    n_slides: int
    auroc_a: float | None
    auroc_b: float | None
    difference: Estimate  # AUROC a − b, paired bootstrap interval
    p_value: float | None  # DeLong
    n_bags: int = 0  # bags with lesions in both: the localization comparison
    localization_difference: Estimate = field(default_factory=lambda: Estimate(None))  # mean per bag, a − b
    localization_p_value: float | None = None  # paired sign-flip test over those bags


@dataclass
class EvaluationReport:
    models: list[ModelReport]
    comparisons: list[Comparison]
    targets: str
    n_boot: int
    seed: int

    @property
    def complete(self) -> bool:
        """True when no slide of targets or outputs was left out."""
        return not any(ids for model in self.models for ids in model.left_out.values())


# --- reading -------------------------------------------------------------------------------------


def read_targets(path: Path, id_column: str, target_column: str) -> dict[str, int]:
    """slide id -> 0/1 from a CSV. Raises UsageError naming the file, the row and the column."""
    try:
        handle = open(path, newline="", encoding="utf-8-sig")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such targets file") from None
    except OSError as err:
        raise UsageError(f"{path}: cannot read targets ({err.strerror})") from None
    targets: dict[str, int] = {}
    with handle:
        try:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            for name, flag in ((id_column, "--id-column"), (target_column, "--target-column")):
                if name not in columns:
                    found = ", ".join(columns) if columns else "none"
                    raise UsageError(f"{path}: no column {name!r} ({flag}); columns: {found}")
            for line, record in enumerate(reader, start=2):
                slide = (record.get(id_column) or "").strip()
                text = (record.get(target_column) or "").strip()
                if not slide:
                    raise UsageError(f"{path}: line {line}: empty {id_column}")
                if text not in ("0", "1"):
                    raise UsageError(f"{path}: line {line}: {target_column} must be 0 or 1, got {text!r}")
                if slide in targets:
                    raise UsageError(f"{path}: line {line}: slide {slide!r} is listed twice")
                targets[slide] = int(text)
        except (csv.Error, UnicodeDecodeError) as err:
            raise UsageError(f"{path}: not a readable CSV ({err})") from None
    if not targets:
        raise UsageError(f"{path}: no slides in the targets file")
    return targets


def bags_files(directory: Path) -> list[Path]:
    """The bags files of a `smcli score -o DIR` directory: `_bags.csv` and any shard files."""
    if not directory.is_dir():
        what = "no such directory" if not directory.exists() else "not a directory"
        raise UsageError(f"{directory}: {what} (give the output directories of `smcli score -o DIR`)")
    files = sorted(directory.glob("_bags.shard-*-of-*.csv"))
    main = directory / "_bags.csv"
    if main.is_file():
        files.insert(0, main)
    if not files:
        raise UsageError(f"{directory}: no _bags.csv (is it an output directory of `smcli score -o DIR`?)")
    return files


def read_bag_rows(directory: Path) -> tuple[dict[str, dict[str, str]], list[str]]:
    """bag_id -> its last row in the directory's bags files, and the columns seen.

    A bag listed again (a later run, another shard) is described by its last row.
    """
    rows: dict[str, dict[str, str]] = {}
    columns: list[str] = []
    for path in bags_files(directory):
        try:
            with open(path, newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                for name in reader.fieldnames or []:
                    if name not in columns:
                        columns.append(name)
                if "bag_id" not in columns or "status" not in columns:
                    raise UsageError(f"{path}: not an smcli bags file (no bag_id/status columns)")
                for record in reader:
                    if record.get("bag_id"):
                        rows.pop(record["bag_id"], None)  # keep file order = the latest row last
                        rows[record["bag_id"]] = record
        except (OSError, csv.Error, UnicodeDecodeError) as err:
            raise UsageError(f"{path}: cannot read ({err})") from None
    return rows, columns


def _float(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


@dataclass(frozen=True)
class ModelSource:
    """Where a directory's figures for the evaluated model are: its own columns (`probability`,
    `auroc`, tables' `attention_logit` — an ensemble's combined ones), or with `member`, one ensemble
    model's (its item of `model_probabilities` / `model_aurocs`, tables' `attention_logit_<member>`)."""

    member: str | None = None

    @property
    def probability_column(self) -> str:
        return "probability" if self.member is None else f"model_probabilities ({self.member})"

    @property
    def score_column(self) -> str:
        return "attention_logit" if self.member is None else f"attention_logit_{self.member}"

    def probability(self, record: dict[str, str]) -> float | None:
        return self._figure(record, "probability", "model_probabilities")

    def auroc(self, record: dict[str, str]) -> float | None:
        return self._figure(record, "auroc", "model_aurocs")

    def _figure(self, record: dict[str, str], own: str, listed: str) -> float | None:
        if self.member is None:
            return _float(record.get(own))
        names = (record.get("model_names") or "").split(";")
        values = (record.get(listed) or "").split(";")
        if self.member not in names or len(values) != len(names):
            return None
        return _float(values[names.index(self.member)])


def model_source(rows: dict[str, dict[str, str]], model: str | None, directory: Path) -> ModelSource:
    """The ModelSource for `--model` (None: the directory's own figures); UsageError for an unknown name."""
    if model is None:
        return ModelSource()
    members: list[str] = []
    for record in rows.values():
        for name in (record.get("model_names") or "").split(";"):
            if name and name not in members:
                members.append(name)
    if model not in members:
        known = ", ".join(members) if members else "none: not an ensemble"
        raise UsageError(f"{directory}: no model {model!r} in _bags.csv (models: {known})")
    return ModelSource(model)


def table_path(directory: Path, bag_id: str) -> Path | None:
    for suffix in (".csv", ".parquet"):
        path = directory / f"{bag_id}{suffix}"
        if path.is_file():
            return path
    return None


def read_instances(path: Path, score_column: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(scores (N,), labels (N,)) from a per-bag table, or None when it has no `label` column.

    Raises UsageError when the table lacks the score column or cannot be read.
    """
    import pyarrow as pa

    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            names = pq.read_schema(path).names
            wanted = [c for c in (score_column, "label") if c in names]
            table = pq.read_table(path, columns=wanted)
        else:
            import pyarrow.csv as pacsv

            with open(path, encoding="utf-8", errors="replace") as handle:
                names = handle.readline().rstrip("\n").split(",")
            wanted = [c for c in (score_column, "label") if c in names]
            table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(include_columns=wanted))
    except (OSError, pa.ArrowException) as err:
        raise UsageError(f"{path}: cannot read ({str(err).splitlines()[0]})") from None
    if score_column not in names:
        raise UsageError(f"{path}: no column {score_column!r}")
    if "label" not in names:
        return None
    column_type = table.column(score_column).type
    if not (pa.types.is_floating(column_type) or pa.types.is_integer(column_type)):
        raise UsageError(f"{path}: column {score_column!r} is not numeric ({column_type})")
    scores = table.column(score_column).to_numpy(zero_copy_only=False)
    labels = table.column("label").to_numpy(zero_copy_only=False)
    if table.column("label").null_count or not np.isin(labels, (0, 1)).all():
        raise UsageError(f"{path}: column 'label' must hold 0/1 only")
    if table.column(score_column).null_count or not np.isfinite(scores).all():
        raise UsageError(f"{path}: column {score_column!r} holds missing or non-finite values")
    return scores, labels.astype(np.int8)


# --- one directory -------------------------------------------------------------------------------


def unique_names(directories: list[Path]) -> list[str]:
    """Each directory's name (e.g. `sm_abmil` for out/sm_abmil/); a name used twice gets `#position`."""
    names = [d.resolve().name or str(d) for d in directories]
    return [f"{name}#{i + 1}" if names.count(name) > 1 else name for i, name in enumerate(names)]


def collect(
    directory: Path, name: str, targets: dict[str, int], model: str | None
) -> tuple[list[ScoredSlide], dict[str, list[str]], str, str, list[str]]:
    """The slides of one directory matched to targets, what was left out, and notes."""
    rows, columns = read_bag_rows(directory)
    source = model_source(rows, model, directory)
    left_out: dict[str, list[str]] = {
        "not in targets": [],
        "missing from outputs": [],
        "failed in scoring": [],
        "no probability": [],
    }
    notes: list[str] = []
    slides: list[ScoredSlide] = []
    for bag_id, record in rows.items():
        if bag_id not in targets:
            left_out["not in targets"].append(bag_id)
        elif record.get("status") not in KEPT_STATUSES or table_path(directory, bag_id) is None:
            reason = "failed in scoring" if record.get("status") == "error" else "missing from outputs"
            left_out[reason].append(bag_id)
        else:
            slides.append(ScoredSlide(bag_id, targets[bag_id], source.probability(record)))
    left_out["missing from outputs"] += [s for s in targets if s not in rows]
    with_probability = [s for s in slides if s.probability is not None]
    if with_probability or not slides:
        left_out["no probability"] = [s.bag_id for s in slides if s.probability is None]
        slides = with_probability
    else:  # a model without a head: instance level only
        notes.append(f"{name}: no bag probabilities in _bags.csv (a model without a head): no bag level")
    for slide in slides:
        _attach_instances(directory, slide, rows[slide.bag_id], source, notes)
    return (
        slides,
        {k: v for k, v in left_out.items() if v},
        source.probability_column,
        source.score_column,
        notes,
    )


def _attach_instances(
    directory: Path, slide: ScoredSlide, record: dict, source: ModelSource, notes: list
) -> None:
    """Read the slide's per-bag table: its instance scores by label, its localization AUROC.

    The AUROC is cross-checked against `_bags.csv`: the two can never disagree without an error.
    """
    path = table_path(directory, slide.bag_id)
    assert path is not None
    n_instances = _float(record.get("n_instances"))
    read = read_instances(path, source.score_column)
    if read is None:
        return
    scores, labels = read
    if n_instances is not None and scores.shape[0] != int(n_instances):
        notes.append(
            f"{path}: {scores.shape[0]} of {int(n_instances)} patches (a --top-k table): not used "
            "for the instance level"
        )
        return
    slide.positives = scores[labels == 1].astype(np.float64)
    slide.negatives = scores[labels == 0].astype(np.float64)
    slide.localization_auroc = stats.roc_auc(labels, scores)
    recorded = source.auroc(record)
    computed = slide.localization_auroc
    if (recorded is None) != (computed is None) or (
        recorded is not None and computed is not None and abs(recorded - computed) > AUROC_AGREEMENT
    ):
        raise UsageError(
            f"{path}: localization AUROC {computed} from the table but {recorded} in _bags.csv "
            f"({'auroc' if source.member is None else f'model_aurocs ({source.member})'}): the table and "
            "_bags.csv disagree; score the bag again"
        )


# --- metrics -------------------------------------------------------------------------------------


def bag_level(
    slides: list[ScoredSlide], threshold: float, source: str, n_boot: int, seed: int, name: str
) -> BagLevel:
    targets = np.array([s.target for s in slides], dtype=np.int64)
    scores = np.array([s.probability for s in slides], dtype=np.float64)
    if targets.size == 0 or targets.min() == targets.max():
        present = "no slides" if targets.size == 0 else f"all {targets.size} slides have target {targets[0]}"
        raise UsageError(f"{name}: bag-level metrics need positive and negative slides ({present})")
    resamples = stats.stratified_resamples(targets, n_boot, seed)

    def estimate(metric, fast=None) -> Estimate:
        """The metric (scikit-learn's where it has one) and its interval from `fast`, the same metric
        without scikit-learn's per-call overhead."""
        draw = fast or metric
        return stats.bootstrap(
            lambda rows: draw(targets[rows], scores[rows]), resamples, metric(targets, scores)
        )

    def at_threshold(key: str):
        return lambda t, s: stats.threshold_metrics(t, s, threshold)[key]

    return BagLevel(
        n_slides=int(targets.size),
        n_positive=int(targets.sum()),
        threshold=threshold,
        threshold_source=source,
        auroc=estimate(stats.roc_auc, stats.fast_auroc),
        average_precision=estimate(stats.average_precision, stats.fast_average_precision),
        balanced_accuracy=estimate(at_threshold("balanced_accuracy")),
        sensitivity=estimate(at_threshold("sensitivity")),
        specificity=estimate(at_threshold("specificity")),
    )


def instance_level(
    slides: list[ScoredSlide], score_column: str, n_boot: int, seed: int
) -> InstanceLevel | None:
    """Per-bag mean and pooled localization AUROC over the bags with labels, CIs by resampling bags
    (stratified by whether a bag holds positive patches)."""
    labelled = [s for s in slides if s.positives is not None and s.negatives is not None]
    if not labelled:
        return None
    positives: list[np.ndarray] = [s.positives for s in labelled if s.positives is not None]
    negatives: list[np.ndarray] = [s.negatives for s in labelled if s.negatives is not None]
    n_pos = np.array([p.size for p in positives], dtype=np.float64)
    n_neg = np.array([n.size for n in negatives], dtype=np.float64)
    per_bag = np.array([np.nan if s.localization_auroc is None else s.localization_auroc for s in labelled])
    has_both = ~np.isnan(per_bag)

    pooled_scores = np.concatenate(
        [np.concatenate([p, n]) for p, n in zip(positives, negatives, strict=True)]
    )
    pooled_labels = np.concatenate(
        [np.r_[np.ones(p.size), np.zeros(n.size)] for p, n in zip(positives, negatives, strict=True)]
    )
    pooled_value = stats.roc_auc(pooled_labels, pooled_scores)
    mean_value = float(per_bag[has_both].mean()) if has_both.any() else None

    resamples = stats.stratified_resamples(n_pos > 0, n_boot, seed)
    counts = stats.pair_counts(positives, negatives)
    n_bags = len(labelled)

    def pooled(rows: np.ndarray) -> float | None:
        return stats.pooled_auroc_weighted(counts, n_pos, n_neg, np.bincount(rows, minlength=n_bags))

    def mean(rows: np.ndarray) -> float | None:
        drawn = per_bag[rows]
        drawn = drawn[~np.isnan(drawn)]
        return float(drawn.mean()) if drawn.size else None

    return InstanceLevel(
        score_column=score_column,
        n_bags=n_bags,
        n_bags_both_classes=int(has_both.sum()),
        n_instances=int(n_pos.sum() + n_neg.sum()),
        n_positive_instances=int(n_pos.sum()),
        per_bag_mean=stats.bootstrap(mean, resamples, mean_value),
        pooled=stats.bootstrap(pooled, resamples, pooled_value),
    )


def compare(a: ModelReport, b: ModelReport, n_boot: int, seed: int) -> Comparison | None:
    """DeLong's test and a paired bootstrap of AUROC a − b on the slides both scored; the same for
    the per-bag localization AUROC (paired bootstrap over bags, sign-flip test)."""
    comparison = _compare_bags(a, b, n_boot, seed)
    if comparison is None:
        if a.instance is None or b.instance is None:
            return None
        comparison = Comparison(a.name, b.name, 0, None, None, Estimate(None), None)
    by_id = {s.bag_id: s.localization_auroc for s in b.slides if s.localization_auroc is not None}
    pairs = [
        (s.localization_auroc, by_id[s.bag_id])
        for s in a.slides
        if s.localization_auroc is not None and s.bag_id in by_id
    ]
    if pairs:
        differences = np.array([x - y for x, y in pairs], dtype=np.float64)
        rows = np.random.default_rng(seed).integers(0, differences.size, size=(n_boot, differences.size))
        comparison.n_bags = int(differences.size)
        comparison.localization_difference = stats.bootstrap(
            lambda drawn: float(differences[drawn].mean()), rows, float(differences.mean())
        )
        comparison.localization_p_value = stats.sign_flip_test(differences, max(n_boot, 1000), seed)
    return comparison


def _compare_bags(a: ModelReport, b: ModelReport, n_boot: int, seed: int) -> Comparison | None:
    if a.bag is None or b.bag is None:
        return None
    by_id = {s.bag_id: s for s in b.slides}
    common = [(s, by_id[s.bag_id]) for s in a.slides if s.bag_id in by_id]
    targets = np.array([s.target for s, _ in common], dtype=np.int64)
    scores_a = np.array([s.probability for s, _ in common], dtype=np.float64)
    scores_b = np.array([t.probability for _, t in common], dtype=np.float64)
    if targets.size == 0 or targets.min() == targets.max():
        return Comparison(a.name, b.name, int(targets.size), None, None, Estimate(None), None)
    auroc_a, auroc_b = stats.roc_auc(targets, scores_a), stats.roc_auc(targets, scores_b)
    assert auroc_a is not None and auroc_b is not None

    def difference(rows: np.ndarray) -> float | None:
        first = stats.fast_auroc(targets[rows], scores_a[rows])
        second = stats.fast_auroc(targets[rows], scores_b[rows])
        return None if first is None or second is None else first - second

    resamples = stats.stratified_resamples(targets, n_boot, seed)
    return Comparison(
        a.name,
        b.name,
        int(targets.size),
        auroc_a,
        auroc_b,
        stats.bootstrap(difference, resamples, auroc_a - auroc_b),
        stats.delong_test(targets, scores_a, scores_b),
    )


def evaluate(request: EvaluateRequest) -> EvaluationReport:
    """Evaluate every directory against the targets. Raises UsageError (exit 2) for bad input."""
    if not 0 <= request.n_boot <= MAX_BOOT:
        raise UsageError(f"--n-boot must be between 0 and {MAX_BOOT}, got {request.n_boot}")
    if request.threshold is not None and request.threshold_from:
        raise UsageError("--threshold and --threshold-from exclude each other")
    if request.threshold is not None and not 0.0 <= request.threshold <= 1.0:
        raise UsageError(f"--threshold must be a probability in [0, 1], got {request.threshold}")
    if request.threshold_from and len(request.threshold_from) != len(request.directories):
        raise UsageError(
            f"--threshold-from given {len(request.threshold_from)} times for {len(request.directories)} "
            "directories: give one per directory, in the same order"
        )
    targets = read_targets(request.targets, request.id_column, request.target_column)
    models: list[ModelReport] = []
    for index, (directory, name) in enumerate(
        zip(request.directories, unique_names(request.directories), strict=True)
    ):
        slides, left_out, probability_column, score_column, notes = collect(
            directory, name, targets, request.model
        )
        threshold, source = 0.5, "default"
        if request.threshold is not None:
            threshold, source = request.threshold, "--threshold"
        elif request.threshold_from:
            threshold, source = _youden_from(request.threshold_from[index], targets, request.model)
        has_probability = any(s.probability is not None for s in slides)
        bag = (
            bag_level(slides, threshold, source, request.n_boot, request.seed, printable(str(directory)))
            if has_probability or not slides
            else None
        )
        instance = instance_level(slides, score_column, request.n_boot, request.seed)
        if instance is None:
            notes.append(f"{name}: no per-bag table with a 'label' column: no instance level")
        models.append(
            ModelReport(name, str(directory), probability_column, slides, bag, instance, left_out, notes)
        )
    comparisons = [
        c
        for i, a in enumerate(models)
        for b in models[i + 1 :]
        if (c := compare(a, b, request.n_boot, request.seed)) is not None
    ]
    return EvaluationReport(models, comparisons, str(request.targets), request.n_boot, request.seed)


def _youden_from(directory: Path, targets: dict[str, int], model: str | None) -> tuple[float, str]:
    """The threshold maximizing Youden's J on another scored directory (e.g. a validation set)."""
    rows, columns = read_bag_rows(directory)
    source = model_source(rows, model, directory)
    pairs = [
        (targets[bag_id], value)
        for bag_id, record in rows.items()
        if bag_id in targets
        and record.get("status") in KEPT_STATUSES
        and (value := source.probability(record)) is not None
    ]
    labels = np.array([t for t, _ in pairs], dtype=np.int64)
    if labels.size == 0 or labels.min() == labels.max():
        raise UsageError(
            f"{directory}: --threshold-from needs scored slides of both targets ({labels.size} matched)"
        )
    return stats.youden_threshold(labels, np.array([p for _, p in pairs])), f"Youden's J on {directory}"
