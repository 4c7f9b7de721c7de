"""Output: CSV/parquet tables written atomically (temporary file + rename), and the three sinks.

- StdoutSink: one CSV stream on stdout (header once).
- TableSink: one .csv/.parquet file holding every bag, plus `<stem>_bags.csv` beside it.
- DirectorySink: `OUT/<bag_id>.csv|.parquet` per bag plus `OUT/_bags.csv`, rewritten after each bag.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from smcli.errors import OutputError, UsageError
from smcli.files import MAX_BAG_ID_BYTES, atomic_path, safe_bag_id  # noqa: F401  (also imported from here)
from smcli.results import BagResult, BagSummary

BAGS_COLUMNS = [  # the first nine are the core columns; localization and provenance follow
    "bag_id",
    "path",
    "n_instances",
    "n_edges",
    "logit",
    "probability",
    "status",
    "error",
    "seconds",
    "auroc",
    "warnings",
    "patch_step",
    "patch_step_source",
    "dist_thr",
    "input_bytes",
    "model_sha256",
    "device",
    "smcli_version",
    "scored_at",
]
FORMATS = ("csv", "parquet")


def _describe_os_error(err: OSError) -> str:
    return err.strerror or type(err).__name__


def write_table(
    table,
    path: Path,
    fmt: str,
    metadata: dict[str, str] | None = None,
    commit: Callable[[], None] | None = None,
) -> None:
    """Write one pyarrow Table as CSV or parquet, atomically (see atomic_path). Raises OutputError."""
    try:
        with atomic_path(path, commit) as tmp:
            if fmt == "csv":
                with open(tmp, "wb") as handle:
                    write_csv(table, handle, header=True)
            else:
                import pyarrow.parquet as pq

                if metadata:
                    merged = dict(table.schema.metadata or {})
                    merged.update({k.encode(): v.encode() for k, v in metadata.items()})
                    table = table.replace_schema_metadata(merged)
                pq.write_table(table, tmp)
    except OSError as err:
        raise OutputError(f"{path}: cannot write ({_describe_os_error(err)})") from None


def write_csv(table, handle, header: bool) -> None:
    """A pyarrow Table as plain CSV (no quotes) into a binary file; pandas for values needing quotes.

    Floats are written in their shortest round-trip form.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv

    try:
        body = pa.BufferOutputStream()
        pacsv.write_csv(table, body, pacsv.WriteOptions(include_header=False, quoting_style="none"))
    except pa.ArrowInvalid:  # a bag id with a comma, quote or newline: quote it properly
        handle.write(table.to_pandas().to_csv(index=False, header=header).encode())
        return
    if header:  # our column names never need quotes
        handle.write((",".join(table.schema.names) + "\n").encode())
    handle.write(body.getvalue().to_pybytes())


def conform(table, schema):
    """`table` with `schema`'s columns, in order: missing ones (e.g. label) null, extra ones dropped."""
    import pyarrow as pa

    if table.schema.names == schema.names:
        return table if table.schema.equals(schema) else table.cast(schema)
    columns = [
        table.column(field.name).cast(field.type)
        if field.name in table.schema.names
        else pa.nulls(table.num_rows, field.type)
        for field in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def bags_row(summary: BagSummary) -> list[str]:
    """One `_bags.csv` row as text: full-precision floats, empty cells for missing values."""
    values = asdict(summary)
    values["warnings"] = "; ".join(summary.warnings)
    return [_cell(values[name]) for name in BAGS_COLUMNS]


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):  # numpy floats too; repr keeps every digit
        return repr(float(value))
    return str(value)


def csv_rows_written(writer, rows: list[list[str]]) -> None:
    """The rows of the bags file (a seam where tests deliver a signal mid-write)."""
    writer.writerows(rows)


def write_bags_csv(rows: list[list[str]], path: Path, commit: Callable[[], None] | None = None) -> None:
    """Write the bags file (header + rows) atomically; cheap enough to redo after every bag."""
    import csv

    try:
        with atomic_path(path, commit) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(BAGS_COLUMNS)
            csv_rows_written(writer, rows)
    except OSError as err:
        raise OutputError(f"{path}: cannot write ({_describe_os_error(err)})") from None


def output_format(output: Path | None, requested: str | None) -> str:
    """The table format: from -o's extension for single tables, else --format (default csv)."""
    if output is not None and output.suffix in (".csv", ".parquet"):
        implied = output.suffix[1:]
        if requested is not None and requested != implied:
            raise UsageError(f"--format {requested} contradicts the output file name {output}")
        return implied
    fmt = requested or "csv"
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}: use csv or parquet")
    if output is None and fmt != "csv":
        raise UsageError("parquet needs an output file or directory (-o)")
    return fmt


class StdoutSink:
    """All bags as one CSV on stdout; nothing else goes to stdout."""

    fatal_write_errors = True

    def __init__(self) -> None:
        self.header_written = False

    def precheck(self, path: Path, bag_id: str) -> BagResult | None:
        return None

    def add(self, result: BagResult) -> None:
        if result.arrow is None:
            return
        sys.stdout.flush()
        write_csv(result.arrow, sys.stdout.buffer, header=not self.header_written)
        sys.stdout.buffer.flush()
        self.header_written = True

    def close(self, complete: bool) -> None:
        return None


class TableSink:
    """Every bag into one table file, streamed to a temporary file and renamed at the end.

    All or nothing: an interrupted or failed run leaves no table (use a directory to resume).
    """

    fatal_write_errors = True

    def __init__(self, path: Path, fmt: str, overwrite: bool = False) -> None:
        self.path = path
        self.fmt = fmt
        self.bags_path = path.with_name(f"{path.stem}_bags.csv")
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self.summaries: list[BagSummary] = []
        self.writer: Any = None  # pyarrow.parquet.ParquetWriter once the first bag arrives
        self.schema: Any = None
        self.started = False
        self.model_config_json = ""
        if not path.parent.is_dir():
            raise UsageError(f"{path}: the directory {path.parent} does not exist")
        if path.exists() and not overwrite:
            raise UsageError(f"{path}: output exists; pass --overwrite to replace it")
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise UsageError(f"{path}: the directory {path.parent} is not writable")

    def precheck(self, path: Path, bag_id: str) -> BagResult | None:
        return None

    def add(self, result: BagResult) -> None:
        try:
            if result.arrow is not None:
                self._append(result)
        except (OSError, ValueError) as err:
            self._discard()
            reason = _describe_os_error(err) if isinstance(err, OSError) else str(err).splitlines()[0]
            raise OutputError(f"{self.path}: cannot write ({reason})") from None
        self.summaries.append(result.summary)

    def _append(self, result: BagResult) -> None:
        table = result.arrow
        if self.schema is None:
            self.schema = table.schema
        else:
            table = conform(table, self.schema)  # one table: the first bag's columns and types
        if self.fmt == "csv":
            with open(self.tmp, "ab") as handle:
                write_csv(table, handle, header=not self.started)
        else:
            import pyarrow.parquet as pq

            if self.writer is None:
                self.writer = pq.ParquetWriter(self.tmp, self.schema)
            self.writer.write_table(table)
        self.started = True

    def _provenance(self) -> dict[str, str]:
        """File metadata of a multi-bag table: the shared fields, then every bag's, as JSON."""
        import json

        per_bag = [s.provenance(self.model_config_json) for s in self.summaries if s.status == "ok"]
        shared = (
            {k: v for k, v in per_bag[0].items() if all(p.get(k) == v for p in per_bag)} if per_bag else {}
        )
        shared["smcli.bags"] = json.dumps(
            [{k: v for k, v in p.items() if k not in shared} for p in per_bag], sort_keys=True
        )
        return shared

    def _discard(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
            self.writer = None
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()

    def close(self, complete: bool) -> None:
        if not complete:
            self._discard()
            return
        try:
            if self.writer is not None:
                self.writer.add_key_value_metadata(self._provenance())
                self.writer.close()
                self.writer = None
            if self.started:
                os.replace(self.tmp, self.path)
            write_bags_csv([bags_row(summary) for summary in self.summaries], self.bags_path)
        except OSError as err:
            self._discard()
            raise OutputError(f"{self.path}: cannot write ({_describe_os_error(err)})") from None


class DirectorySink:
    """One file per bag plus `_bags.csv` (rewritten after every bag), each written atomically.

    existing: what to do when a bag's output file is already there: 'fail' the bag (default),
    'skip' it when the file is complete, or 'overwrite' it.
    """

    fatal_write_errors = False

    def __init__(
        self, directory: Path, fmt: str, existing: str = "fail", bags_name: str = "_bags.csv"
    ) -> None:
        self.directory = directory
        self.fmt = fmt
        self.existing = existing
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(
                f"{directory}: cannot create output directory ({_describe_os_error(err)})"
            ) from None
        if not os.access(directory, os.W_OK | os.X_OK):
            raise UsageError(f"{directory}: output directory is not writable")
        self.bags_path = directory / bags_name
        self.previous = self._previous_rows()
        self.summaries: list[BagSummary] = []
        self.rows: list[list[str]] = []  # rendered once, rewritten in full after every bag
        self.claimed: set[str] = set()
        self.seen: set[str] = set()
        self.model_config_json = ""

    def table_path(self, bag_id: str) -> Path:
        return self.directory / f"{bag_id}.{self.fmt}"

    def _previous_rows(self) -> dict[str, dict]:
        """Rows of an earlier run's bags file, to carry into 'skipped' rows."""
        import csv

        try:
            with open(self.bags_path, newline="") as handle:
                rows = list(csv.DictReader(handle))
        except (OSError, UnicodeDecodeError, csv.Error):
            return {}
        return {row["bag_id"]: row for row in rows if row.get("bag_id") and row.get("n_instances")}

    def precheck(self, path: Path, bag_id: str) -> BagResult | None:
        """Answer for a bag whose output exists, or whose id an earlier input took, before it is read.

        Called by the one reader thread, in input order.
        """
        if bag_id in self.seen:
            error = f"{path}: bag_id {bag_id!r} was already used by an earlier input in this run"
            return BagResult(BagSummary(bag_id=bag_id, path=str(path), status="error", error=error))
        self.seen.add(bag_id)
        target = self.table_path(bag_id) if safe_bag_id(bag_id) else None
        if target is None or not target.exists() or self.existing == "overwrite":
            return None
        if self.existing == "skip" and table_is_complete(target, self.fmt):
            return skipped_result(path, bag_id, self.previous.get(bag_id))
        if self.existing == "skip":
            return None  # an incomplete file (not written by smcli): score the bag again
        result = skipped_result(path, bag_id, self.previous.get(bag_id))  # keeps the earlier figures
        result.summary.status = "error"
        result.summary.error = (
            f"{target} exists; pass --skip-existing to keep it or --overwrite to replace it"
        )
        return result

    def add(self, result: BagResult) -> None:
        try:
            if result.arrow is not None:
                bag_id = result.summary.bag_id
                if not safe_bag_id(bag_id):
                    raise OutputError(
                        f"{result.summary.path}: bag_id {bag_id!r} cannot be used as a file name"
                    )
                if bag_id in self.claimed:
                    raise OutputError(
                        f"{result.summary.path}: bag_id {bag_id!r} was already written in this run "
                        "(two inputs with the same name)"
                    )
                metadata = result.summary.provenance(self.model_config_json)
                self.claimed.add(bag_id)
                # the bags file is rewritten in the same breath as the rename: no interrupt between
                write_table(
                    result.arrow, self.table_path(bag_id), self.fmt, metadata, lambda: self._record(result)
                )
                return
        except OutputError as err:
            result.summary.status = "error"
            result.summary.error = str(err)
            result.arrow = None
            if not any(summary is result.summary for summary in self.summaries):
                self._record(result)
            raise
        self._record(result)

    def _record(self, result: BagResult) -> None:
        self.summaries.append(result.summary)
        self.rows.append(bags_row(result.summary))
        write_bags_csv(self.rows, self.bags_path)

    def close(self, complete: bool) -> None:
        return None


def table_is_complete(path: Path, fmt: str) -> bool:
    """True if `path` is a whole table (smcli renames files into place only when complete)."""
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            pq.read_metadata(path)
            return True
        with open(path, "rb") as handle:
            first = handle.readline()
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 1))
            last = handle.read(1)
        return first.startswith(b"bag_id,instance,") and last == b"\n"
    except Exception:
        return False


def skipped_result(path: Path, bag_id: str, previous: dict | None) -> BagResult:
    summary = BagSummary(bag_id=bag_id, path=str(path), status="skipped")
    if previous:
        for name in (
            "n_instances",
            "n_edges",
            "logit",
            "probability",
            "patch_step",
            "patch_step_source",
            "dist_thr",
        ):
            value = previous.get(name)
            if value not in ("", None):
                setattr(summary, name, value)
    return BagResult(summary)
