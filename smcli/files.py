"""File safety on the ground floor: atomic writes (temporary file + rename), safe output names,
and stdout writes that either deliver every byte or raise.

Every module that writes a file (tables, checkpoints, bags, images) uses `atomic_path`, so a reader
never sees half a file and an interrupted run leaves no partial output under the final name; the
file is fsynced before the rename and its directory after, so a power loss does not either.
Every writer of data to stdout uses `write_stdout`.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from smcli.errors import OutputError, SmcliError, StdoutClosed
from smcli.interrupts import GUARD

MAX_BAG_ID_BYTES = 200  # leaves room for the suffix and the temporary-file prefix in a 255-byte name


@contextlib.contextmanager
def atomic_path(
    path: Path,
    commit: Callable[[], None] | None = None,
    guard: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds.

    `commit`, if given, runs right after the rename, and an interrupt cannot fall between the two;
    `guard()`, if given, is held around both (e.g. a lock on the directory).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        # some writers (safetensors) create 0600 files: give the usual umask-based permissions
        os.chmod(tmp, 0o666 & ~_umask())
        fsync_file(tmp)  # the bytes on disk before the name: a power loss leaves old or new, not empty
        with GUARD.critical(), (guard() if guard is not None else contextlib.nullcontext()):
            os.replace(tmp, path)
            fsync_directory(path.parent)  # and the rename itself on disk
            if commit is not None:
                commit()
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def fsync_file(path: Path) -> None:
    """Flush a written file's data to the disk (the writers close their own handles first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(directory: Path) -> None:
    """Flush a directory's entries (a rename) to the disk; skipped where directories cannot be
    opened or synced (some network and FUSE file systems)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def prepare_file_output(path: Path, overwrite: bool, error: type[SmcliError] = OutputError) -> None:
    """The one rule for a command's output *file*: an existing one is refused unless `overwrite`
    (one line naming --overwrite); a missing parent directory is created, as `-o DIR/` is.

    Raises `error` (UsageError for a command's single output, OutputError for one bag's file).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise error(f"{path}: output exists; pass --overwrite to replace it")
    if path.is_dir():
        raise error(f"{path}: is a directory, not an output file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise error(
            f"{path}: cannot create the directory {path.parent} ({err.strerror or type(err).__name__})"
        ) from None


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def safe_bag_id(bag_id: str) -> bool:
    """A bag id usable as a file name inside the output directory (no control characters either:
    a file name with a line break breaks every script that lists the directory)."""
    return (
        bool(bag_id)
        and bag_id.isprintable()
        and len(bag_id.encode("utf-8", "surrogateescape")) <= MAX_BAG_ID_BYTES
        and bag_id not in (".", "..")
        and not bag_id.startswith("_bags")
        and not any(ch in bag_id for ch in "/\\\0")
    )


def per_bag_target(output: Path, bag_id: str, suffix: str) -> Path:
    """OUT itself when it names a `suffix` file (one bag); otherwise OUT/<bag_id><suffix>.

    Raises OutputError when the bag id cannot be a file name inside OUT.
    """
    if output.suffix.lower() == suffix:
        return output
    if not safe_bag_id(bag_id):
        raise OutputError(f"{output}: bag_id {bag_id!r} cannot be used as a file name")
    return output / f"{bag_id}{suffix}"


def write_stdout(data: bytes) -> None:
    """Write all of `data` to stdout, or raise: StdoutClosed when the reader went away (EPIPE),
    OutputError naming stdout for any other failure (ENOSPC, EFBIG under `ulimit -f`, EIO).

    Why not `sys.stdout.buffer.write`: after a partial write (a file that hits `ulimit -f` or a
    nearly full disk) it may return a short count and drop the rest without raising. Here every
    short count is followed by another write of the rest, which then fails with the real errno.
    """
    import sys

    stream = sys.stdout
    try:
        stream.flush()  # text already printed goes first, in order
        fd = stream.fileno()
    except (AttributeError, ValueError, OSError):  # no real descriptor (e.g. a test runner's buffer)
        fd = -1
    try:
        if fd < 0:
            _write_all(stream.buffer.write, data)
            stream.buffer.flush()
        else:
            _write_all(lambda chunk: os.write(fd, chunk), data, fd)
    except BrokenPipeError:
        raise StdoutClosed("stdout: the reader closed the pipe") from None
    except OSError as err:
        raise OutputError(f"stdout: cannot write ({err.strerror or type(err).__name__})") from None


def _write_all(write: Callable[[memoryview], int | None], data: bytes, fd: int = -1) -> None:
    """Call `write` on the unwritten rest until none is left (short counts are normal for pipes)."""
    import select

    view = memoryview(data)
    while view:
        try:
            written = write(view)
        except BlockingIOError:  # a non-blocking stdout that is full: wait until it drains
            if fd < 0:
                raise
            select.select([], [fd], [])
            continue
        if written is None:  # a raw stream that would block
            continue
        if written <= 0:
            raise OSError(errno.EIO, os.strerror(errno.EIO))  # no progress and no errno: never spin
        view = view[written:]


PROVENANCE_SUFFIX = ".smcli.json"  # beside a per-bag CSV, hidden: `.<bag_id>.csv.smcli.json`


def provenance_sidecar(table: Path) -> Path:
    return table.with_name(f".{table.name}{PROVENANCE_SUFFIX}")


def read_provenance(table: Path) -> dict[str, str] | None:
    """The `smcli.*` provenance a per-bag table carries: parquet key-value metadata, or for a CSV
    its sidecar, trusted only when the sidecar's `smcli.table_sha256` is the CSV's own hash (a
    sidecar left from another version of the file describes nothing). None when there is none."""
    import hashlib
    import json

    try:
        if table.suffix == ".parquet":
            import pyarrow.parquet as pq

            raw = pq.read_metadata(table).metadata or {}
            found = {k.decode(): v.decode() for k, v in raw.items() if k.startswith(b"smcli.")}
            return found or None
        document = json.loads(provenance_sidecar(table).read_text(encoding="utf-8"))
        digest = hashlib.sha256()
        with open(table, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except Exception:  # missing, unreadable or not ours: no provenance
        return None
    if not isinstance(document, dict) or document.get("smcli.table_sha256") != digest.hexdigest():
        return None
    return {str(k): str(v) for k, v in document.items()}
