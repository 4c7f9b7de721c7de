"""Output: CSV/parquet tables written atomically (temporary file + rename), and the three sinks.

- StdoutSink: one CSV stream on stdout (header once).
- TableSink: one .csv/.parquet file holding every bag, plus `<stem>_bags.csv` beside it.
- DirectorySink: `OUT/<bag_id>.csv|.parquet` per bag plus `OUT/_bags.csv`, merged after each bag.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from smcli.errors import OutputError, UsageError, printable
from smcli.files import (  # noqa: F401  (also imported from here)
    MAX_BAG_ID_BYTES,
    PROVENANCE_SUFFIX,
    atomic_path,
    fsync_directory,
    fsync_file,
    prepare_file_output,
    provenance_sidecar,
    read_provenance,
    safe_bag_id,
    write_stdout,
)
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
    "coords_units",
    "dist_thr",
    "input_bytes",
    "model_sha256",
    "device",
    "smcli_version",
    "scored_at",
    "ensemble",  # an ensemble's combination, then each model's figures in -m order, ';'-separated
    "model_names",
    "model_probabilities",
    "model_aurocs",
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
    guard: Callable[[], Any] | None = None,
) -> None:
    """Write one pyarrow Table as CSV or parquet, atomically (see atomic_path). Raises OutputError."""
    try:
        with atomic_path(path, commit, guard) as tmp:
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
    """A pyarrow Table as plain CSV (see csv_bytes) into a binary file."""
    handle.write(csv_bytes(table, header))


def csv_bytes(table, header: bool) -> bytes:
    """A pyarrow Table as plain CSV (no quotes); pandas for values needing quotes.

    Floats are written in their shortest round-trip form.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv

    try:
        body = pa.BufferOutputStream()
        pacsv.write_csv(table, body, pacsv.WriteOptions(include_header=False, quoting_style="none"))
    except pa.ArrowInvalid:  # a bag id with a comma, quote or newline: quote it properly
        return table.to_pandas().to_csv(index=False, header=header).encode()
    head = (",".join(table.schema.names) + "\n").encode() if header else b""  # names never need quotes
    return head + body.getvalue().to_pybytes()


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
    if isinstance(value, list):  # an ensemble's per-model figures: one cell, ';' between models
        return ";".join(_cell(item) for item in value)
    if isinstance(value, float):  # numpy floats too; repr keeps every digit
        return repr(float(value))
    # a path that is not valid UTF-8 is written as \udcXX, a control character as \xNN: the
    # file stays one valid UTF-8 line per bag for every reader
    return printable(str(value))


def csv_rows_written(writer, rows: list[list[str]]) -> None:
    """The rows of the bags file (a seam where tests deliver a signal mid-write)."""
    writer.writerows(rows)


def write_bags_csv(rows: list[list[str]], path: Path, commit: Callable[[], None] | None = None) -> None:
    """Write the bags file (header + rows) atomically; cheap enough to redo after every bag."""
    import csv

    try:
        # backslashreplace: a path that is not valid UTF-8 is written as \udcXX, never an exception
        with (
            atomic_path(path, commit) as tmp,
            open(tmp, "w", newline="", encoding="utf-8", errors="backslashreplace") as handle,
        ):
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(BAGS_COLUMNS)
            csv_rows_written(writer, rows)
    except OSError as err:
        raise OutputError(f"{path}: cannot write ({_describe_os_error(err)})") from None


def append_bags_row(row: list[str], path: Path) -> None:
    """Append one row to an existing bags file in a single write, then fsync it. Keeps a big
    cohort linear: rewriting the whole file after each new bag made the run quadratic."""
    import csv
    import io

    line = io.StringIO()
    csv.writer(line, lineterminator="\n").writerow(row)
    data = line.getvalue().encode("utf-8", "backslashreplace")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            if os.write(fd, data) != len(data):  # a short write leaves a partial line: refuse it
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        raise OutputError(f"{path}: cannot write ({_describe_os_error(err)})") from None


TEMPORARY_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")  # atomic_path's names


def remove_stale_temporaries(directory: Path, keep: Callable[[str], bool] = lambda name: True) -> list[Path]:
    """Remove `.<name>.<pid>.tmp` files (atomic_path's) whose process is gone, e.g. was SIGKILLed.

    Only names for which `keep(name)` is true are considered, and only when `pid` is no running
    process on this machine (a live writer's file is left alone). Returns what was removed.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        match = TEMPORARY_NAME.match(entry.name)
        if match is None or not keep(match["name"]) or _process_alive(int(match["pid"])):
            continue
        with contextlib.suppress(OSError):
            os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except (OverflowError, ValueError):
        return pid <= 0  # not a process id at all
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


_HELD_LOCKS: set[str] = set()  # directories this process holds: directory_lock is reentrant


@contextlib.contextmanager
def directory_lock(directory: Path) -> Iterator[None]:
    """An exclusive flock on the directory itself (no lock file left behind), held around a bag
    file's rename and the bags-file merge that records it, so concurrent runs serialize there.
    Reentrant within this process. Where the file system has no flock, no lock."""
    import fcntl

    key = os.path.abspath(directory)
    if key in _HELD_LOCKS:
        yield
        return
    _HELD_LOCKS.add(key)
    try:
        with _flock(directory, fcntl):
            yield
    finally:
        _HELD_LOCKS.discard(key)


@contextlib.contextmanager
def _flock(directory: Path, fcntl) -> Iterator[None]:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        fd = -1
    try:
        if fd >= 0:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd >= 0:
            os.close(fd)  # closing releases the lock


def read_bags_csv(path: Path) -> list[list[str]]:
    """The rows of a bags file in BAGS_COLUMNS order ('' for columns an older file lacks); [] if none."""
    import csv
    import io

    try:
        with open(path, newline="", encoding="utf-8", errors="replace") as handle:
            text = handle.read()
        if text and not text.endswith("\n"):  # an append cut short (a crash): not a row
            text = text[: text.rfind("\n") + 1]
        records = list(csv.DictReader(io.StringIO(text, newline="")))
    except (OSError, csv.Error):
        return []
    return [[record.get(name) or "" for name in BAGS_COLUMNS] for record in records if record.get("bag_id")]


def table_rows(path: Path, fmt: str) -> int | None:
    """Data rows in an output table, read in blocks (memory stays flat); None if it is not whole.

    CSV: smcli's header and a final newline, then one line per row. Parquet: the footer's count.
    """
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return int(pq.read_metadata(path).num_rows)
        lines, first, last = 0, b"", b""
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                if not first:
                    first = block[:64]
                lines += block.count(b"\n")
                last = block[-1:]
        if not first.startswith(b"bag_id,instance,") or last != b"\n":
            return None
        return lines - 1
    except Exception:
        return None


def _number(text: str, kind: type) -> Any:
    try:
        return kind(float(text)) if kind is int else float(text)
    except (TypeError, ValueError, OverflowError):
        return None


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


def refuse_duplicate(result: BagResult, written: set[str]) -> bool:
    """In one table, a bag id may appear once: a second bag claiming it becomes that bag's error.

    Returns True (and turns `result` into an error) for a duplicate; else records the id.
    """
    bag_id = result.summary.bag_id
    if result.arrow is None:
        return False
    if bag_id in written:
        result.summary.status = "error"
        result.summary.error = (
            f"{result.summary.path}: bag_id {bag_id!r} was already written in this run "
            "(two inputs with the same name)"
        )
        result.arrow = None
        return True
    written.add(bag_id)
    return False


class StdoutSink:
    """All bags as one CSV on stdout; nothing else goes to stdout."""

    fatal_write_errors = True

    def __init__(self) -> None:
        self.header_written = False
        self.written: set[str] = set()

    def precheck(self, path: Path, bag_id: str) -> BagResult | None:
        return None

    def add(self, result: BagResult) -> None:
        if result.arrow is None or refuse_duplicate(result, self.written):
            return
        # every byte reaches stdout, or StdoutClosed (EPIPE) / OutputError (full disk, ulimit -f)
        write_stdout(csv_bytes(result.arrow, header=not self.header_written))
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
        self.written: set[str] = set()
        self.writer: Any = None  # pyarrow.parquet.ParquetWriter once the first bag arrives
        self.schema: Any = None
        self.started = False
        self.model_config_json = ""
        prepare_file_output(path, overwrite, UsageError)  # exists: refused; missing parent: created
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise UsageError(f"{path}: the directory {path.parent} is not writable")
        remove_stale_temporaries(path.parent, lambda name: name in (path.name, self.bags_path.name))

    def precheck(self, path: Path, bag_id: str) -> BagResult | None:
        return None

    def add(self, result: BagResult) -> None:
        try:
            if result.arrow is not None and not refuse_duplicate(result, self.written):
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
                fsync_file(self.tmp)
                os.replace(self.tmp, self.path)
                fsync_directory(self.path.parent)
            write_bags_csv([bags_row(summary) for summary in self.summaries], self.bags_path)
        except OSError as err:
            self._discard()
            raise OutputError(f"{self.path}: cannot write ({_describe_os_error(err)})") from None


KEPT_STATUSES = ("ok", "skipped")  # rows that describe an output file in the directory


class DirectorySink:
    """One file per bag plus `_bags.csv`, each written atomically.

    The bags file describes every output file in the directory, not just this run's: rows of
    earlier runs are kept (an ok row whose file is gone is dropped), a bag scored again replaces
    its row. After every bag it is merged afresh under a lock on the directory, so concurrent
    runs (e.g. shards with one bags file, or two --skip-existing resumes) lose no row.

    existing: what to do when a bag's output file is already there: 'fail' the bag (default;
    the file and its row stay as they are), 'skip' it when the file is complete (its row count
    equals the n_instances recorded for it, and its row names this run's model and an input of the
    same size), or 'overwrite' it.
    """

    fatal_write_errors = False

    def __init__(
        self,
        directory: Path,
        fmt: str,
        existing: str = "fail",
        bags_name: str = "_bags.csv",
        top_k: int | None = None,
    ) -> None:
        self.directory = directory
        self.fmt = fmt
        self.existing = existing
        self.top_k = top_k
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(
                f"{directory}: cannot create output directory ({_describe_os_error(err)})"
            ) from None
        if not os.access(directory, os.W_OK | os.X_OK):
            raise UsageError(f"{directory}: output directory is not writable")
        self.bags_path = directory / bags_name
        remove_stale_temporaries(directory, self._ours)
        self.disk_rows: list[list[str]] = []  # the bags file as last read or written
        self.disk_stamp: tuple | None = None
        self.disk_exact = True  # disk_rows are exactly the file's rows
        self.disk_ids: set[str] = set()
        self.mine: list[list[str]] = []  # this run's rows, in order (duplicate ids kept)
        self.mine_ids: set[str] = set()
        self.refused: set[str] = set()  # 'output exists' errors: their earlier row stays
        self.summaries: list[BagSummary] = []
        self.claimed: set[str] = set()
        self.seen: set[str] = set()
        self.model_config_json = ""
        self.model_sha256 = ""  # set by the caller: a kept file made by another model is rescored
        self.options_json = ""  # set by the caller: the scoring options a kept file must share
        self.written: dict[str, list[list[str]]] = {}  # bag id -> the rows this run last wrote for it
        self.other_bags_files: dict[Path, tuple] = {}  # path -> (stamp, ids) of other runs' bags files
        self.globbed_at = -1e9  # when the directory was last listed for them

    def _ours(self, name: str) -> bool:
        return name == self.bags_path.name or name.endswith((".csv", ".parquet", PROVENANCE_SUFFIX))

    def file_provenance(self, summary: BagSummary) -> dict[str, str]:
        """What a per-bag file says about itself: how it was made (model, options, version) and
        its bag figures, so a resume and a reader trust the file, not a row about it."""
        metadata = summary.provenance(self.model_config_json)
        for name in ("n_instances", "logit", "probability", "auroc"):
            value = getattr(summary, name)
            metadata[f"smcli.{name}"] = "" if value is None else repr(value)
        metadata["smcli.options"] = self.options_json
        # the whole bags-file row as written now (all columns, e.g. an ensemble's per-model
        # figures), without wall-clock fields: the file stays reproducible bit for bit
        row = dict(zip(BAGS_COLUMNS, bags_row(summary), strict=True))
        row.update(seconds="", scored_at="")
        metadata["smcli.bags_row"] = json.dumps(row, sort_keys=True)
        return metadata

    def table_path(self, bag_id: str) -> Path:
        return self.directory / f"{bag_id}.{self.fmt}"

    def _refresh(self) -> bool:
        """Re-read the bags file if anyone changed it since this run last read or wrote it
        (True when it did)."""
        try:
            st = os.stat(self.bags_path)
            stamp: tuple | None = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        if stamp == self.disk_stamp and stamp is not None:
            return False
        rows = read_bags_csv(self.bags_path)
        status, bag_id = BAGS_COLUMNS.index("status"), BAGS_COLUMNS.index("bag_id")
        self.disk_rows = [  # an ok row whose file was deleted describes nothing any more
            row
            for row in rows
            if row[status] not in KEPT_STATUSES
            or (safe_bag_id(row[bag_id]) and self.table_path(row[bag_id]).exists())
        ]
        self.disk_exact = len(self.disk_rows) == len(rows)  # else the next write rewrites the file
        self.disk_ids = {row[0] for row in self.disk_rows}
        self.disk_stamp = stamp
        return True

    def _recorded(self, bag_id: str) -> dict | None:
        """The latest row of the bags file that describes `bag_id`'s output file, read fresh."""
        with directory_lock(self.directory):
            self._refresh()
        for row in reversed(self.disk_rows):
            record = dict(zip(BAGS_COLUMNS, row, strict=True))
            if record["bag_id"] == bag_id and record["status"] in KEPT_STATUSES:
                return record
        return None

    def _current(self, path: Path, record: dict) -> bool:
        """The kept file was made by this run's model from an input of the same size.

        A resume with another model (or after the input file was rewritten) must not keep scores
        that model never produced: those bags are scored again.
        """
        if record.get("model_sha256", "") != self.model_sha256:
            return False
        recorded_bytes = _number(record.get("input_bytes", ""), int)
        try:
            size = os.stat(path).st_size
        except OSError:
            return False
        return recorded_bytes is None or recorded_bytes == size

    def _complete(self, target: Path, record: dict | None) -> bool:
        """The kept file holds as many rows as its recorded bag had instances (top-k: at most k)."""
        if record is None:
            return False  # no figures to check against (or a writer has not recorded it yet)
        n = _number(record.get("n_instances", ""), int)
        if n is None:
            return False
        expected = n if self.top_k is None else min(self.top_k, n)
        return table_rows(target, self.fmt) == expected

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
        if self.existing == "skip":
            # the file's own provenance decides, never a row about it (which another run may own)
            provenance = read_provenance(target)
            if provenance is not None:
                made = {key.removeprefix("smcli."): value for key, value in provenance.items()}
                with contextlib.suppress(ValueError, TypeError):
                    made = {**json.loads(made.get("bags_row", "{}")), **made}
                same_options = made.get("options") == self.options_json
                if same_options and self._current(path, made) and self._complete(target, made):
                    return skipped_result(path, bag_id, made)
            return None  # incomplete, stale, made otherwise or unknown: score the bag again
        record = self._recorded(bag_id)
        result = skipped_result(path, bag_id, record)  # keeps the earlier figures
        result.summary.status = "error"
        result.summary.error = (
            f"{target} exists; pass --skip-existing to keep it or --overwrite to replace it"
        )
        if record is not None:
            self.refused.add(bag_id)
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
                metadata = self.file_provenance(result.summary)
                self.claimed.add(bag_id)
                # the bags file is rewritten in the same breath as the rename, under the directory
                # lock: no interrupt between, and no other run's rename either
                if self.fmt == "csv":
                    self._write_csv(result, metadata)
                else:
                    write_table(
                        result.arrow,
                        self.table_path(bag_id),
                        self.fmt,
                        metadata,
                        lambda: self._record(result),
                        lambda: directory_lock(self.directory),
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

    def _write_csv(self, result: BagResult, metadata: dict[str, str]) -> None:
        """The CSV and its provenance sidecar (which names the CSV's sha256): the sidecar is
        renamed right after the CSV, so a crash between leaves a sidecar that matches nothing."""
        import hashlib
        import json

        target = self.table_path(result.summary.bag_id)
        sidecar = provenance_sidecar(target)
        sidecar_tmp = sidecar.with_name(f".{sidecar.name}.{os.getpid()}.tmp")

        def commit() -> None:
            os.replace(sidecar_tmp, sidecar)
            fsync_directory(self.directory)
            self._record(result)

        try:
            with atomic_path(target, commit, lambda: directory_lock(self.directory)) as tmp:
                with open(tmp, "wb") as handle:
                    write_csv(result.arrow, handle, header=True)
                digest = hashlib.sha256()
                with open(tmp, "rb") as written:
                    for block in iter(lambda: written.read(1 << 20), b""):
                        digest.update(block)
                metadata["smcli.table_sha256"] = digest.hexdigest()
                text = json.dumps(metadata, indent=1, sort_keys=True) + "\n"
                sidecar_tmp.write_text(text, encoding="utf-8")
                fsync_file(sidecar_tmp)
        except OSError as err:
            raise OutputError(f"{target}: cannot write ({_describe_os_error(err)})") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                sidecar_tmp.unlink()

    def _record(self, result: BagResult) -> None:
        summary = result.summary
        self.summaries.append(summary)
        if summary.status == "error" and summary.bag_id in self.refused:
            return  # the file was left alone, so is the row that describes it
        row = bags_row(summary)
        bag_id = row[0]  # as written (a non-UTF-8 id escaped)
        self.mine.append(row)
        self.mine_ids.add(bag_id)
        with directory_lock(self.directory):
            reread = self._refresh()
            if not reread and self.disk_exact and bag_id not in self.disk_ids:
                # the common case, kept O(1) per bag: nobody touched the file since this run wrote
                # it and the bag is new there, so its row is appended, not the file rewritten
                append_bags_row(row, self.bags_path)
                self.disk_rows.append(row)
                self.disk_ids.add(bag_id)
                self.written[bag_id] = [row]
                self._stamp_disk()
                self._reconcile_other_bags_files(bag_id)
                return
            on_disk: dict[str, list[list[str]]] = {}
            for disk_row in self.disk_rows:
                on_disk.setdefault(disk_row[0], []).append(disk_row)
            # a bag this run wrote earlier whose row another run has replaced since was rewritten
            # by that run (renames and records happen under this lock): its row stays theirs
            for other in [i for i in self.written if i != bag_id]:
                if on_disk.get(other) not in (None, self.written[other]):
                    del self.written[other]
            if bag_id in self.written and on_disk.get(bag_id) == self.written[bag_id]:
                self.written[bag_id].append(row)  # a second input with this id: its error row too
            else:
                self.written[bag_id] = [row]
            rows = [r for r in self.disk_rows if r[0] not in self.written]
            rows += [r for rows_of in self.written.values() for r in rows_of]
            if self.disk_stamp is not None and self.disk_exact and rows[:-1] == self.disk_rows:
                append_bags_row(rows[-1], self.bags_path)  # a new bag: one line, not the whole file
            else:  # a row replaced or dropped: the file is rewritten whole, atomically
                write_bags_csv(rows, self.bags_path)
            self.disk_rows, self.disk_exact = rows, True
            self.disk_ids = {r[0] for r in rows}
            self._stamp_disk()
            self._reconcile_other_bags_files(bag_id)

    def _stamp_disk(self) -> None:
        with contextlib.suppress(OSError):
            st = os.stat(self.bags_path)
            self.disk_stamp = (st.st_ino, st.st_mtime_ns, st.st_size)

    def _reconcile_other_bags_files(self, bag_id: str) -> None:
        """Drop `bag_id`'s rows from the directory's other bags files (the main one, shards'):
        this run's row now describes its file, so theirs would contradict it."""
        now = time.monotonic()
        if now - self.globbed_at > 5.0:  # listing the directory per bag would be O(bags) each time
            self.globbed_at = now
            for found in self.directory.glob("_bags*.csv"):
                self.other_bags_files.setdefault(found, ((), set()))
        for path in sorted(self.other_bags_files):
            if path == self.bags_path:
                continue
            try:
                st = os.stat(path)
            except OSError:
                continue
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            cached = self.other_bags_files.get(path)
            if cached is not None and cached[0] == stamp:
                ids = cached[1]
            else:
                rows = read_bags_csv(path)
                ids = {row[0] for row in rows}
            if bag_id in ids:
                rows = [row for row in read_bags_csv(path) if row[0] != bag_id]
                write_bags_csv(rows, path)
                ids = {row[0] for row in rows}
                with contextlib.suppress(OSError):
                    st = os.stat(path)
                    stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            self.other_bags_files[path] = (stamp, ids)

    def close(self, complete: bool) -> None:
        return None


def skipped_result(path: Path, bag_id: str, previous: dict | None) -> BagResult:
    """A 'skipped' row carrying the figures recorded for the kept file (numbers parsed back)."""
    summary = BagSummary(bag_id=bag_id, path=str(path), status="skipped")
    if previous:
        for name, kind in (
            ("n_instances", int),
            ("n_edges", int),
            ("logit", float),
            ("probability", float),
            ("patch_step", float),
            ("dist_thr", float),
            ("auroc", float),
            ("input_bytes", int),
        ):
            setattr(summary, name, _number(previous.get(name, ""), kind))
        for name in (
            "patch_step_source",
            "coords_units",
            "model_sha256",
            "device",
            "smcli_version",
            "scored_at",
            "ensemble",
        ):
            setattr(summary, name, previous.get(name, ""))
        if previous.get("model_names"):  # an ensemble's per-model figures, ';'-separated
            summary.model_names = previous["model_names"].split(";")
            for name in ("model_probabilities", "model_aurocs"):
                setattr(summary, name, [_number(item, float) for item in previous.get(name, "").split(";")])
    return BagResult(summary)
