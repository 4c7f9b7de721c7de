"""HDF5 bags as TRIDENT, CLAM and STAMP write them: same scores as their safetensors twins."""

from __future__ import annotations

import io
import sys

import h5py
import numpy as np
import pandas as pd
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file
from typer.testing import CliRunner

from smcli.bags import BagKeys, find_bags, load_bag, peek_bag_id
from smcli.checkpoint import ModelConfig, PoolConfig, build_module, save_checkpoint
from smcli.cli import app
from smcli.errors import BagError
from smcli.graph import build_adjacency, grid_cells

IN_DIM = 12
LEVEL0_STEP = 512  # TRIDENT: patch_size 256 at 20x on a 40x slide
TILE_UM = 256.0  # STAMP's tile_size_um

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def grid_cells_with_holes(seed: int = 0, shape=(9, 7)) -> np.ndarray:
    """(N, 2) integer grid cells (x, y): a ragged blob with holes and one isolated cell."""
    rng = np.random.default_rng(seed)
    cells = [(x, y) for x in range(shape[0]) for y in range(shape[1]) if rng.random() < 0.75]
    cells.append((shape[0] + 4, shape[1] + 2))
    return np.array(cells, dtype=np.int64)


def features_for(n: int, seed: int = 0, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed + 100).standard_normal((n, IN_DIM)).astype(dtype)


# --- writers: the layouts the tools produce -----------------------------------------------------


def _tool_dataset(handle, name, data):
    """TRIDENT's and CLAM's save_h5/save_hdf5: resizable, chunked one row at a time."""
    return handle.create_dataset(
        name, data=data, maxshape=(None, *data.shape[1:]), chunks=(1, *data.shape[1:]), dtype=data.dtype
    )


def write_trident(path, features, coords, patch_size=256, level0=40, target=20, labels=None):
    """TRIDENT features_<encoder>/<slide>.h5: attributes of the patching step on `coords`."""
    with h5py.File(path, "w") as handle:
        feats = _tool_dataset(handle, "features", features.astype(np.float32))
        feats.attrs["name"] = path.stem
        feats.attrs["savetodir"] = str(path.parent)
        dset = _tool_dataset(handle, "coords", coords.astype(np.int64))
        dset.attrs["patch_size"] = patch_size
        dset.attrs["patch_size_level0"] = patch_size * level0 // target
        dset.attrs["level0_magnification"] = level0
        dset.attrs["target_magnification"] = target
        dset.attrs["overlap"] = 0
        dset.attrs["name"] = path.stem
        dset.attrs["savetodir"] = str(path.parent)
        if labels is not None:
            handle["labels"] = labels
    return path


def write_clam(path, features, coords):
    """CLAM h5_files/<slide>.h5: features + coords, no attributes."""
    with h5py.File(path, "w") as handle:
        _tool_dataset(handle, "features", features.astype(np.float32))
        _tool_dataset(handle, "coords", coords.astype(np.int32))
    return path


def write_stamp(path, features, coords_um, tile_size_um=TILE_UM, on_coords=False, name="feats"):
    """STAMP <extractor>/<slide>.h5: float16 `feats`, micrometre `coords`, attributes on the file."""
    with h5py.File(path, "w") as handle:
        handle["coords"] = coords_um.astype(np.float32)
        handle[name] = features.astype(np.float16)
        handle.attrs["stamp_version"] = "2.3.0"
        handle.attrs["extractor"] = "ctranspath"
        handle.attrs["unit"] = "um"
        handle.attrs["tile_size_px"] = 224
        handle.attrs["code_hash"] = "0123abcd"
        handle.attrs["feat_type"] = "tile"
        target = handle["coords"] if on_coords else handle
        target.attrs["tile_size_um"] = tile_size_um
    return path


def write_twin(path, features, coords, patch_size=None):
    """The same bag as a safetensors file, the step in the metadata as smcli documents it."""
    metadata = {"patch_size": str(patch_size)} if patch_size is not None else None
    tensors = {"features": features, "coords": coords}
    save_file(tensors, str(path), metadata=metadata)
    return path


def trident_bag(directory, name="slide_t", seed=0, labels=None):
    cells = grid_cells_with_holes(seed)
    coords = cells * LEVEL0_STEP + np.array([20_480, 7_168])
    features = features_for(len(coords), seed)
    return write_trident(directory / f"{name}.h5", features, coords, labels=labels), features, coords


LAYOUTS = {
    "trident": lambda d, f, c: write_trident(d / "slide.h5", f, c),
    "clam": lambda d, f, c: write_clam(d / "slide.h5", f, c),
    "stamp": lambda d, f, c: write_stamp(d / "slide.h5", f, c),
}


def layout_data(fmt: str, seed: int = 0):
    """(features, coords, twin patch_size) stored as the tool stores them."""
    cells = grid_cells_with_holes(seed)
    if fmt == "stamp":
        return (
            features_for(len(cells), seed, np.float16),
            (cells * TILE_UM + 37.5).astype(np.float32),
            TILE_UM,
        )
    if fmt == "clam":
        return features_for(len(cells), seed), (cells * 256 + 1_024).astype(np.int32), None
    return features_for(len(cells), seed), (cells * LEVEL0_STEP + 4_096).astype(np.int64), LEVEL0_STEP


@pytest.fixture
def model_file(tmp_path):
    config = ModelConfig(PoolConfig(IN_DIM, 6), head=True)
    state = build_module(config).state_dict()
    state["pool.sm.sm.coef"] = np.array(1.6, dtype=np.float32)
    path = tmp_path / "model.safetensors"
    save_checkpoint(state, config, path)
    return path


def score_to_table(tmp_path, model_file, *inputs, extra=()):
    out = tmp_path / f"scores_{len(list(tmp_path.iterdir()))}.csv"
    result = invoke("score", *inputs, "-m", model_file, "-o", out, *extra)
    assert result.exit_code == 0, result.stderr
    return pd.read_csv(out), pd.read_csv(out.with_name(f"{out.stem}_bags.csv"))


# --- tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["trident", "clam", "stamp"])
def test_h5_scores_equal_its_safetensors_twin(tmp_path, model_file, fmt):
    features, coords, step = layout_data(fmt)
    (tmp_path / "h5").mkdir()
    (tmp_path / "st").mkdir()
    h5_path = LAYOUTS[fmt](tmp_path / "h5", features, coords)
    twin = write_twin(tmp_path / "st" / "slide.safetensors", features, coords, step)

    h5_table, h5_bags = score_to_table(tmp_path, model_file, h5_path)
    st_table, st_bags = score_to_table(tmp_path, model_file, twin)
    for column in ("instance", "x", "y", "attention_logit", "attention_weight"):
        np.testing.assert_array_equal(h5_table[column].to_numpy(), st_table[column].to_numpy())
    assert h5_table["bag_id"].unique().tolist() == ["slide"]
    assert h5_bags.loc[0, "probability"] == st_bags.loc[0, "probability"]
    assert h5_bags.loc[0, "n_edges"] == st_bags.loc[0, "n_edges"] > 0
    assert h5_bags.loc[0, "patch_step"] == st_bags.loc[0, "patch_step"]
    assert h5_bags.loc[0, "patch_step_source"] == ("inferred" if fmt == "clam" else "bag")

    bag = load_bag(h5_path)
    assert bag.metadata["format"] == fmt
    assert bag.features.dtype == features.dtype
    assert bag.coords.dtype == coords.dtype
    assert bag.patch_size == step


def test_trident_step_is_patch_size_level0_not_patch_size(tmp_path, model_file):
    path, _, coords = trident_bag(tmp_path)
    # the premise: the 20x patch size on 40x coordinates leaves every patch two cells from the next
    assert build_adjacency(grid_cells(coords, 256)).n_edges == 0
    bag = load_bag(path)
    assert bag.patch_size == LEVEL0_STEP
    assert bag.metadata["patch_size_source"] == "coords.attrs['patch_size_level0']"
    _, summary = score_to_table(tmp_path, model_file, path)
    assert summary.loc[0, "patch_step"] == LEVEL0_STEP and summary.loc[0, "n_edges"] > 0

    _, wrong = score_to_table(tmp_path, model_file, path, extra=("--patch-size", "256"))
    assert wrong.loc[0, "n_edges"] == 0
    assert "graph has no edges" in wrong.loc[0, "warnings"]


@pytest.mark.parametrize("on_coords", [False, True])
def test_stamp_tile_size_on_file_or_on_coords(tmp_path, on_coords):
    features, coords, _ = layout_data("stamp")
    path = write_stamp(tmp_path / "s.h5", features, coords, on_coords=on_coords)
    bag = load_bag(path)
    assert bag.patch_size == TILE_UM
    where = "coords.attrs['tile_size_um']" if on_coords else "attrs['tile_size_um']"
    assert bag.metadata["patch_size_source"] == where
    assert bag.metadata["coords_units"] == "micrometres"


def test_stamp_patch_embeddings_name(tmp_path):
    features, coords, _ = layout_data("stamp")
    bag = load_bag(write_stamp(tmp_path / "s.h5", features, coords, name="patch_embeddings"))
    assert bag.metadata["format"] == "stamp" and bag.features.shape == (len(coords), IN_DIM)


def test_mixed_directory_is_scored_in_one_run(tmp_path, model_file):
    bags = tmp_path / "bags"
    bags.mkdir()
    trident_bag(bags, "a_trident")
    features, coords, _ = layout_data("stamp", 1)
    write_stamp(bags / "b_stamp.hdf5", features, coords)
    features, coords, step = layout_data("trident", 2)
    write_twin(bags / "c_st.safetensors", features, coords, step)
    (bags / "notes.txt").write_text("not a bag")
    assert [p.name for p in find_bags([bags])] == ["a_trident.h5", "b_stamp.hdf5", "c_st.safetensors"]
    out = tmp_path / "out"
    result = invoke("score", bags, "-m", model_file, "-o", out)
    assert result.exit_code == 0, result.stderr
    summary = pd.read_csv(out / "_bags.csv")
    assert summary["bag_id"].tolist() == ["a_trident", "b_stamp", "c_st"]
    assert summary["status"].tolist() == ["ok"] * 3


@pytest.mark.parametrize("name", ["disguised.safetensors", "no_extension"])
def test_h5_detected_by_content_not_name(tmp_path, model_file, name):
    source, _, _ = trident_bag(tmp_path)
    path = source.rename(tmp_path / name)
    assert load_bag(path).metadata["format"] == "trident"
    assert peek_bag_id(path) == path.stem
    result = invoke("score", path, "-m", model_file)
    assert result.exit_code == 0, result.stderr
    assert pd.read_csv(io.StringIO(result.stdout))["bag_id"].unique().tolist() == [path.stem]


def test_missing_dataset_lists_what_is_there(tmp_path, model_file):
    path = tmp_path / "odd.h5"
    with h5py.File(path, "w") as handle:
        handle["emb"] = features_for(5)
        handle["coords"] = np.arange(10).reshape(5, 2)
        handle.create_group("extra")["thumb"] = np.zeros(3)
    result = invoke("score", path, "-m", model_file)
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {path}: no 'features', 'feats' or 'patch_embeddings' dataset "
        "(keys present: coords, emb, extra/thumb)"
    ]
    # --features-key names it; the layout is no tool's, so the format is plain h5
    bag = load_bag(path, BagKeys(features="emb"))
    assert bag.metadata["format"] == "h5" and bag.patch_size is None
    stamp = write_stamp(tmp_path / "s.h5", *layout_data("stamp")[:2])
    with pytest.raises(BagError, match=r"no 'emb' dataset \(keys present: coords, feats\)"):
        load_bag(stamp, BagKeys(features="emb"))
    with pytest.raises(BagError, match=r"no 'xy' dataset"):
        load_bag(path, BagKeys(features="emb", coords="xy"))


@pytest.mark.parametrize("content", [b"garbage", b"\x89PNG\r\n\x1a\n" + bytes(64), b""])
def test_neither_format_is_one_clear_line(tmp_path, model_file, content):
    path = tmp_path / "junk.h5"
    path.write_bytes(content)
    result = invoke("score", path, "-m", model_file)
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert errors[0].startswith(f"error: {path}: not a safetensors bag or corrupt header")
    assert "not an HDF5 file either" in errors[0]
    assert "Traceback" not in result.stderr


def test_corrupt_h5_is_one_line(tmp_path):
    source, _, _ = trident_bag(tmp_path)
    data = source.read_bytes()
    path = tmp_path / "cut.h5"
    path.write_bytes(data[:200])
    with pytest.raises(BagError, match=rf"^{path}: not a readable HDF5 bag"):
        load_bag(path)


def test_same_checks_as_safetensors(tmp_path):
    features, coords, _ = layout_data("clam")
    features[3, 2] = np.nan
    with pytest.raises(BagError, match=r"features has non-finite values \(NaN or inf\) in 1 of"):
        load_bag(write_clam(tmp_path / "nan.h5", features, coords))
    features, coords, _ = layout_data("clam")
    with pytest.raises(BagError, match=r"features has \d+ rows but coords has \d+"):
        load_bag(write_clam(tmp_path / "rows.h5", features, coords[:-1]))
    with pytest.raises(BagError, match=r"coords must have shape \(N, 2\)"):
        load_bag(write_clam(tmp_path / "shape.h5", features, np.zeros((len(features), 3), np.int32)))
    with pytest.raises(BagError, match=r"feats has dtype int32; expected one of float16"):
        path = write_stamp(tmp_path / "int.h5", features, coords.astype(np.float32))
        with h5py.File(path, "a") as handle:
            del handle["feats"]
            handle["feats"] = np.zeros((len(coords), IN_DIM), np.int32)
        load_bag(path)
    with pytest.raises(BagError, match="empty bag"):
        load_bag(write_clam(tmp_path / "empty.h5", features[:0], coords[:0]))


def test_batch_axis_and_labels(tmp_path, model_file):
    features, coords, _ = layout_data("clam")
    path = tmp_path / "batched.h5"
    with h5py.File(path, "w") as handle:
        handle["features"] = features[None]
        handle["coords"] = coords[None]
    bag = load_bag(path)
    assert bag.features.shape == features.shape and bag.coords.shape == coords.shape

    labels = (np.arange(len(coords)) % 3 == 0).astype(np.uint8)
    path, _, _ = trident_bag(tmp_path, "labelled", labels=labels)
    result = invoke("score", path, "-m", model_file)
    assert result.exit_code == 0, result.stderr
    assert pd.read_csv(io.StringIO(result.stdout))["label"].tolist() == labels.tolist()
    with pytest.raises(BagError, match="labels must hold 0/1 instance labels"):
        with h5py.File(path, "a") as handle:
            handle["labels"][0] = 7
        load_bag(path)


@pytest.mark.parametrize("value", [-512, "None", np.array([512, 256])])
def test_bad_step_attribute(tmp_path, value):
    path, _, _ = trident_bag(tmp_path)
    with h5py.File(path, "a") as handle:
        handle["coords"].attrs["patch_size_level0"] = value
    with pytest.raises(
        BagError, match=r"coords.attrs\['patch_size_level0'\] .* (must be positive|not a number)"
    ):
        load_bag(path)


def test_without_h5py_the_error_names_the_extra(tmp_path, monkeypatch):
    path, _, _ = trident_bag(tmp_path)
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(BagError) as caught:
        load_bag(path)
    assert str(caught.value) == f"{path}: reading h5 bags needs h5py: pip install 'smcli[h5]'"


@pytest.mark.parametrize("fmt", ["trident", "clam", "stamp"])
def test_convert_bag_round_trip(tmp_path, model_file, fmt):
    features, coords, step = layout_data(fmt)
    source = LAYOUTS[fmt](tmp_path, features, coords)
    out = tmp_path / "converted" / "slide.safetensors"
    out.parent.mkdir()
    result = invoke("convert-bag", source, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert f"wrote {out}" in result.stderr
    with safe_open(str(out), framework="np") as handle:
        metadata = handle.metadata()
        assert handle.get_tensor("features").dtype == features.dtype
    assert metadata["bag_id"] == "slide"
    assert metadata["source_format"] == fmt
    assert metadata.get("patch_size") == (None if step is None else str(float(step)))
    assert metadata["coords_units"] == ("micrometres" if fmt == "stamp" else "level-0 pixels")
    assert not list(out.parent.glob(".*tmp"))

    original, original_bags = score_to_table(tmp_path, model_file, source)
    converted, converted_bags = score_to_table(tmp_path, model_file, out)
    pd.testing.assert_frame_equal(original, converted)
    assert original_bags.loc[0, "patch_step"] == converted_bags.loc[0, "patch_step"]


def test_convert_bag_refuses_to_overwrite_and_bad_input(tmp_path):
    source, _, _ = trident_bag(tmp_path)
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    result = invoke("convert-bag", source, "-o", out)
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    assert out.read_bytes() == b"keep me"
    assert invoke("convert-bag", source, "-o", out, "--overwrite").exit_code == 0
    assert load_bag(out).patch_size == LEVEL0_STEP

    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"junk")
    result = invoke("convert-bag", junk, "-o", tmp_path / "j.safetensors")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        line for line in result.stderr.strip().splitlines() if line.startswith(f"error: {junk}:")
    ]
    assert not (tmp_path / "j.safetensors").exists()
