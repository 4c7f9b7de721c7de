"""Fuzzing `smcli score` with mutated bag files, through the real CLI.

A seeded mutator (random.Random) turns one valid bag into a few hundred broken or odd ones: bit
flips in header and data, truncations, header JSON edits (dtypes, shapes, offsets, duplicated keys,
metadata, header length) and tensors of the wrong dtype or shape written by safetensors itself.
Each batch of mutants is scored in ONE run, next to two good bags, and every run must:

- never crash (no Traceback; in-process: no exception escaping the CLI), exit 0 or 1;
- give every mutant exactly one row in `_bags.csv`, `ok` (its table written) or `error`
  (one `error:` line naming the file);
- write the good bags exactly as a run of them alone does.

One batch runs as a real subprocess under a timeout, to prove that no mutant hangs the run.
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("torchmil")
import torch
from safetensors.torch import save
from torchmil.nn import SmAttentionPool as TorchmilPool
from typer.testing import CliRunner

from smcli.checkpoint import ModelConfig, PoolConfig, save_checkpoint
from smcli.cli import app
from tests.conftest import PATCH

IN_DIM = 6
N_ROWS, N_COLS = 6, 4
N = N_ROWS * N_COLS
BATCHES = 6
PER_BATCH = 50
GOOD = ("good_a", "zz_good_b")  # sort before and after every mutant ("m...")

runner = CliRunner()


# ------------------------------------------------------------------------------------ the bags


def base_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    coords = np.ascontiguousarray(np.argwhere(np.ones((N_ROWS, N_COLS))).astype(np.int64) * PATCH)
    generator = torch.Generator().manual_seed(seed)
    return {
        "features": torch.randn(N, IN_DIM, generator=generator),
        "coords": torch.from_numpy(coords),
        "labels": (torch.arange(N) % 3 == 0).to(torch.uint8),
    }


def serialize(tensors: dict, metadata: dict | None = None) -> bytes:
    """safetensors bytes, made deterministic: the package writes metadata keys in hash order."""
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    blob = save(tensors, metadata={"patch_size": str(PATCH)} if metadata is None else metadata)
    header, data = split(blob)
    return join(json.dumps(header, sort_keys=True, separators=(",", ":")).encode(), data)


def split(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def join(header_text: bytes, data: bytes, length: int | None = None) -> bytes:
    header_text = header_text + b" " * (-len(header_text) % 8)
    return struct.pack("<Q", len(header_text) if length is None else length) + header_text + data


def dump(header: dict) -> bytes:
    return json.dumps(header, separators=(",", ":")).encode()


# ---------------------------------------------------------------------------------- the mutator

TENSOR_KEYS = ("features", "coords", "labels")
DTYPES = [
    "I8",
    "F16",
    "BOOL",
    "U8",
    "I16",
    "U16",
    "I32",
    "U32",
    "I64",
    "U64",
    "F32",
    "F64",
    "BF16",
    "F8_E4M3",
    "F8_E5M2",
    "C64",
    "F4",
    "XYZ",
    "",
    "f32",
    7,
    None,
]
BAG_IDS = [
    "",
    ".",
    "..",
    "_bags",
    "_bags.csv",
    "../escape",
    "a/b",
    "a\\b",
    "x" * 300,
    "dup",
    "dup",
    "with space",
    "ünïcödé",
    "comma,id",
    'quote"id',
    "-",
    "nul\x00id",
]
PATCH_SIZES = ["abc", "", "-1", "0", "nan", "inf", "-inf", "1e308", "1e-300", "256", "512", "0.5", " 256 "]


def _flip_bits(buf: bytearray, lo: int, hi: int, count: int, rng: random.Random) -> None:
    if hi <= lo:
        return
    for _ in range(count):
        buf[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)


def _typed_variant(rng: random.Random) -> tuple[str, dict]:
    """Tensors of a wrong (or unusual but valid) dtype or shape, written by safetensors itself."""
    t = base_tensors(rng.randrange(1000))
    f, c, lab = t["features"], t["coords"], t["labels"]
    variants = {
        "feat_int32": {"features": (f * 10).to(torch.int32)},
        "feat_int64": {"features": (f * 10).to(torch.int64)},
        "feat_uint8": {"features": f.abs().to(torch.uint8)},
        "feat_bool": {"features": f > 0},
        "feat_f8": {"features": f.to(torch.float8_e4m3fn)},
        "feat_complex": {"features": f.to(torch.complex64)},
        "feat_uint16": {"features": f.abs().to(torch.uint16)},
        "feat_f16": {"features": f.to(torch.float16)},
        "feat_bf16": {"features": f.to(torch.bfloat16)},
        "feat_f64": {"features": f.to(torch.float64)},
        "feat_1d": {"features": f.reshape(-1)},
        "feat_scalar": {"features": f[0, 0].clone()},
        "feat_batch1": {"features": f[None]},
        "feat_batch2": {"features": f.reshape(2, N // 2, IN_DIM)},
        "feat_4d": {"features": f[None, None]},
        "feat_wide": {"features": torch.randn(N, IN_DIM + 1)},
        "feat_zero_width": {"features": torch.zeros(N, 0)},
        "feat_transposed": {"features": f.T},
        "feat_nan": {"features": f.index_fill(0, torch.tensor([1, 5]), float("nan"))},
        "feat_inf": {"features": f.index_fill(0, torch.tensor([2]), float("inf"))},
        "feat_huge_f16": {"features": (f * 60000).to(torch.float16)},
        "coords_f32": {"coords": c.to(torch.float32)},
        "coords_f16": {"coords": c.to(torch.float16)},
        "coords_bf16": {"coords": c.to(torch.bfloat16)},
        "coords_bool": {"coords": c > 0},
        "coords_complex": {"coords": c.to(torch.complex64)},
        "coords_f8": {"coords": c.to(torch.float32).to(torch.float8_e5m2)},
        "coords_uint8": {"coords": (c // PATCH).to(torch.uint8)},
        "coords_int8": {"coords": (c // PATCH - 3).to(torch.int8)},
        "coords_uint64": {"coords": c.to(torch.uint64)},
        "coords_n3": {"coords": torch.cat([c, c[:, :1]], dim=1)},
        "coords_1d": {"coords": c.reshape(-1)},
        "coords_batch1": {"coords": c[None]},
        "coords_n21": {"coords": c[:, :, None]},
        "coords_nan": {"coords": c.to(torch.float64).index_fill(0, torch.tensor([3]), float("nan"))},
        "coords_huge": {"coords": c.to(torch.float64) * 1e300},
        "coords_negative": {"coords": c - 10**6},
        "coords_same_point": {"coords": torch.zeros_like(c)},
        "coords_fewer_rows": {"coords": c[:-1]},
        "labels_bool": {"labels": lab.bool()},
        "labels_f32": {"labels": lab.float()},
        "labels_f8": {"labels": lab.float().to(torch.float8_e4m3fn)},
        "labels_two": {"labels": lab * 2},
        "labels_short": {"labels": lab[:-1]},
        "labels_2d": {"labels": lab[:, None]},
        "labels_complex": {"labels": lab.to(torch.complex64)},
        "no_features": {"features": None},
        "no_coords": {"coords": None},
        "nothing": {"features": None, "coords": None, "labels": None},
        "extra_tensor": {"extra": torch.zeros(3)},
        "empty_bag": {
            "features": torch.zeros(0, IN_DIM),
            "coords": torch.zeros(0, 2, dtype=torch.int64),
            "labels": None,
        },
        "one_patch": {"features": f[:1], "coords": c[:1], "labels": lab[:1]},
    }
    name = rng.choice(sorted(variants))
    t.update(variants[name])
    return name, {k: v for k, v in t.items() if v is not None}


def mutate(seed: int) -> tuple[str, bytes]:
    """One mutant bag from `seed`: (kind, file bytes). Deterministic."""
    rng = random.Random(seed)
    valid = serialize(base_tensors(seed % 7))
    header, data = split(valid)
    (n,) = struct.unpack("<Q", valid[:8])
    kind = rng.choice(
        [
            "flip_header",
            "flip_data",
            "truncate",
            "header_length",
            "dtype",
            "shape",
            "offsets",
            "duplicate_key",
            "metadata",
            "header_junk",
            "swap",
            "append",
            "typed",
            "typed",
            "typed",
        ]
    )
    if kind == "flip_header":
        buf = bytearray(valid)
        _flip_bits(buf, 0, 8 + n, rng.randint(1, 3), rng)
        return kind, bytes(buf)
    if kind == "flip_data":
        buf = bytearray(valid)
        _flip_bits(buf, 8 + n, len(buf), rng.randint(1, 16), rng)
        return kind, bytes(buf)
    if kind == "truncate":
        return kind, valid[: rng.randrange(0, len(valid))]
    if kind == "append":
        return kind, valid + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    if kind == "header_length":
        length = rng.choice(
            [
                0,
                1,
                7,
                n - 8,
                n - 1,
                n + 1,
                n + 8,
                len(valid),
                len(valid) + 1,
                2**32,
                100_000_001,
                2**63 - 1,
                2**64 - 1,
            ]
        )
        return kind, struct.pack("<Q", max(0, length)) + valid[8:]
    if kind == "header_junk":
        junk = rng.choice(
            [
                b"",
                b"null",
                b"[]",
                b"[1,2,3]",
                b'"text"',
                b"{",
                b"{}",
                b'{"__metadata__":{}}',
                b"[" * 5000 + b"]" * 5000,
                b"\xff\xfe garbage",
                b'{"features":1}',
            ]
        )
        return kind, join(junk, data)
    key = rng.choice(TENSOR_KEYS)
    if kind == "dtype":
        header[key]["dtype"] = rng.choice(DTYPES)
        return f"{kind}_{key}", join(dump(header), data)
    if kind == "shape":
        shape = header[key]["shape"]
        header[key]["shape"] = rng.choice(
            [
                [],
                [0],
                [N],
                shape[::-1],
                [*shape, 1],
                [1, *shape],
                [shape[0], (shape[1:] or [1])[0] + 1],
                [2**40, 2],
                [-1, 2],
                [N, 0],
                ["a"],
                None,
                [1.5, 2],
            ]
        )
        return f"{kind}_{key}", join(dump(header), data)
    if kind == "offsets":
        start, end = header[key]["data_offsets"]
        header[key]["data_offsets"] = rng.choice(
            [
                [start, end + 8],
                [start, len(data) + 100],
                [end, start],
                [start - 8 if start else 8, end],
                [0, end - start],
                [-8, end],
                [start, 2**64 - 1],
                [start],
                None,
            ]
        )
        return f"{kind}_{key}", join(dump(header), data)
    if kind == "duplicate_key":
        text = dump(header)
        entry = json.dumps(header[key], separators=(",", ":"))
        other = dict(header[key], dtype=rng.choice(["I64", "F32", "U8"]))
        twin = json.dumps(other if rng.random() < 0.5 else header[key], separators=(",", ":"))
        text = text[:-1] + f',"{key}":{twin}}}'.encode()
        if rng.random() < 0.3:
            text = text[:-1] + b',"__metadata__":{"bag_id":"twin"}}'
        assert entry.encode() in text
        return f"{kind}_{key}", join(text, data)
    if kind == "metadata":
        meta = dict(header.get("__metadata__", {}))
        field = rng.choice(["patch_size", "bag_id", "both", "non_string", "drop"])
        if field in ("patch_size", "both"):
            meta["patch_size"] = rng.choice(PATCH_SIZES)
        if field in ("bag_id", "both"):
            meta["bag_id"] = rng.choice(BAG_IDS)
        if field == "non_string":
            meta[rng.choice(["patch_size", "bag_id"])] = rng.choice([256, None, [1], {"a": 1}, True])
        if field == "drop":
            meta = {}
        header["__metadata__"] = meta
        return f"{kind}_{field}", join(dump(header), data)
    if kind == "swap":
        a, b = rng.sample(TENSOR_KEYS, 2)
        header[a], header[b] = header[b], header[a]
        return f"{kind}_{a}_{b}", join(dump(header), data)
    name, tensors = _typed_variant(rng)
    metadata = {"patch_size": str(PATCH)}
    if rng.random() < 0.2:
        metadata["bag_id"] = rng.choice(BAG_IDS[:-1])  # (a NUL cannot go through safetensors' writer)
    return f"typed_{name}", serialize(tensors, metadata)


def test_mutator_is_deterministic_and_varied():
    first = [mutate(seed) for seed in range(200)]
    assert first == [mutate(seed) for seed in range(200)]
    kinds = {kind.split("_")[0] for kind, _ in first}
    assert {
        "flip",
        "truncate",
        "header",
        "dtype",
        "shape",
        "offsets",
        "duplicate",
        "metadata",
        "typed",
    } <= kinds
    assert len({blob for _, blob in first}) > 180


# ------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The model, the two good bags, and their tables when scored alone."""
    root = tmp_path_factory.mktemp("fuzz")
    torch.manual_seed(0)
    model = root / "model.safetensors"
    save_checkpoint(TorchmilPool(IN_DIM, 4).state_dict(), ModelConfig(PoolConfig(IN_DIM, 4)), model)
    good = {}
    for i, name in enumerate(GOOD):
        blob = serialize(base_tensors(100 + i))
        good[name] = blob
        alone = root / f"alone_{name}"
        alone.mkdir()
        (alone / f"{name}.safetensors").write_bytes(blob)
        result = runner.invoke(app, ["score", str(alone), "-m", str(model), "-o", str(root / "reference")])
        assert result.exit_code == 0, result.stderr
    reference = {name: (root / "reference" / f"{name}.csv").read_bytes() for name in GOOD}
    return root, model, good, reference


def write_batch(directory: Path, batch: int, good: dict[str, bytes]) -> dict[str, str]:
    """PER_BATCH mutants plus the good bags in `directory`: {path: kind}."""
    directory.mkdir()
    kinds = {}
    for i in range(PER_BATCH):
        kind, blob = mutate(batch * 1000 + i)
        path = directory / f"m{batch}_{i:02d}_{kind[:40]}.safetensors"
        path.write_bytes(blob)
        kinds[str(path)] = kind
    for name, blob in good.items():
        (directory / f"{name}.safetensors").write_bytes(blob)
    return kinds


def check_run(directory: Path, out: Path, exit_code: int, stderr: str, kinds: dict, reference: dict) -> None:
    problems = []
    assert "Traceback" not in stderr, stderr
    assert exit_code in (0, 1), stderr
    for name, expected in reference.items():
        table = out / f"{name}.csv"
        if not table.exists():
            problems.append(f"good bag {name}: no output file")
        elif table.read_bytes() != expected:
            problems.append(f"good bag {name}: output differs from scoring it alone")

    frame = pd.read_csv(out / "_bags.csv", dtype=str, keep_default_na=False)
    by_path = {}
    for row in frame.to_dict("records"):
        if row["path"] in by_path:
            problems.append(f"two rows for {row['path']}")
        by_path[row["path"]] = row
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    for path, kind in kinds.items():
        row = by_path.get(path)
        if row is None:
            problems.append(f"{kind}: no row in _bags.csv for {path}")
            continue
        if row["status"] == "ok":
            if not (out / f"{row['bag_id']}.csv").exists():
                problems.append(f"{kind}: status ok but no {row['bag_id']}.csv")
        elif row["status"] == "error":
            if path not in row["error"]:
                problems.append(f"{kind}: error does not name the file: {row['error']!r}")
            if f"error: {row['error']}" not in errors:
                problems.append(f"{kind}: no stderr line for its error {row['error']!r}")
        else:
            problems.append(f"{kind}: status {row['status']!r}")
    for name in GOOD:
        row = by_path.get(str(directory / f"{name}.safetensors"))
        if row is None or row["status"] != "ok":
            problems.append(f"good bag {name}: row {row}")
    n_errors = sum(row["status"] == "error" for row in by_path.values())
    if len(errors) != n_errors:
        problems.append(f"{len(errors)} error lines on stderr for {n_errors} error rows")
    if len(by_path) != len(kinds) + len(GOOD):
        problems.append(f"{len(by_path)} rows in _bags.csv for {len(kinds) + len(GOOD)} inputs")
    if (exit_code == 0) != (n_errors == 0):
        problems.append(f"exit {exit_code} with {n_errors} failed bags")
    tmp = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    if tmp:
        problems.append(f"temporary files left: {tmp}")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("batch", range(1, BATCHES))
def test_mutants_in_process(tmp_path, workspace, batch):
    _, model, good, reference = workspace
    directory = tmp_path / "bags"
    kinds = write_batch(directory, batch, good)
    out = tmp_path / "out"
    result = runner.invoke(app, ["score", str(directory), "-m", str(model), "-o", str(out)])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        trace = "".join(traceback.format_exception(*result.exc_info)).splitlines()
        pytest.fail("smcli crashed (a shell would print a Traceback):\n" + "\n".join(trace[-8:]))
    check_run(directory, out, result.exit_code, result.stderr, kinds, reference)


def test_mutants_in_a_real_process_finish_in_time(tmp_path, workspace):
    _, model, good, reference = workspace
    directory = tmp_path / "bags"
    kinds = write_batch(directory, 0, good)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "smcli", "score", str(directory), "-m", str(model), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.stdout == ""
    check_run(directory, out, done.returncode, done.stderr, kinds, reference)
    for line in done.stderr.splitlines():  # nothing but smcli's own one-line messages
        assert line.startswith(("smcli: ", "error: ", "warning: ", "note: ")), repr(line)
