"""The sample slide image: `python sample_bags/generate.py --slide-image` writes a pyramidal tiled
TIFF that OpenSlide opens, in the pixel grid of sample bag slide_01, and the README's overlay
command draws on it."""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import numpy as np
import openslide
import pytest
from PIL import Image
from typer.testing import CliRunner

from smcli.bags import load_bag
from smcli.cli import app

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_bags"
sys.path.insert(0, str(SAMPLES))

import generate  # noqa: E402  (sample_bags/generate.py)


@pytest.fixture(scope="module")
def sample_slide(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    generate.main(["--slide-image", "--out", str(out)])
    return out / "slide_01.tiff"


def test_the_slide_image_is_a_generic_tiff_pyramid_on_the_bags_grid(sample_slide, tmp_path):
    bag = load_bag(SAMPLES / "slide_01.safetensors")
    with openslide.OpenSlide(str(sample_slide)) as handle:
        assert openslide.OpenSlide.detect_format(str(sample_slide)) == "generic-tiff"
        assert handle.level_downsamples == (1.0, 8.0, 32.0)
        width, height = handle.dimensions
        assert (bag.coords.max(axis=0) + 512 <= (width, height)).all()
        kinds, _ = generate.cell_kinds(generate.sample_set(0)[0])
        lesion = generate.texture(generate.LESION)
        for i in range(0, bag.n_instances, 41):  # every 41st patch, read at level 0
            x, y = (int(v) for v in bag.coords[i])
            crop = np.asarray(handle.read_region((x, y), 0, (512, 512)).convert("RGB"))
            # a whole patch of one texture, in phase with the level-0 grid
            expected = lesion if bag.labels[i] else None
            if expected is None:
                expected = generate.texture(
                    int(kinds[(y - bag.coords[:, 1].min()) // 512, (x - bag.coords[:, 0].min()) // 512])
                )
            np.testing.assert_array_equal(crop, np.roll(expected, (-(y % 512), -(x % 512)), axis=(0, 1)))
        glass = np.asarray(handle.read_region((0, 0), 0, (256, 256)).convert("RGB"))
        assert (glass == generate.GLASS_RGB).all()  # no patch near the origin: bare glass
    # lesion and tissue look different even at thumbnail scale
    assert abs(int(lesion.mean()) - int(generate.texture(2).mean())) > 20
    again = generate.write_slide_image(generate.sample_set(0)[0], tmp_path / "again.tiff")
    assert hashlib.sha256(again.read_bytes()).digest() == hashlib.sha256(sample_slide.read_bytes()).digest()


def test_the_readme_overlay_command_draws_the_sample_slide(sample_slide, tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    generate_command, overlay_command = re.search(
        r"```\n(python sample_bags/generate.py --slide-image)\n(smcli heatmap .*?--slide .*?)\n```", readme
    ).groups()
    assert generate_command == "python sample_bags/generate.py --slide-image"
    args = overlay_command.split()[1:]
    monkeypatch.chdir(ROOT)
    args = [str(sample_slide) if a == "sample_bags/slide_01.tiff" else a for a in args]
    args[args.index("-o") + 1] = str(tmp_path / "overlay.png")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    drawn = np.asarray(Image.open(tmp_path / "overlay.png").convert("RGB"))
    committed = np.asarray(Image.open(SAMPLES / "overlay_slide_01.png").convert("RGB"))
    assert drawn.shape == committed.shape
    assert np.abs(drawn.astype(int) - committed).mean() < 2  # the README picture is what it draws


def lesion_and_rest_distance(png: Path, slide: Path, crop: bool) -> tuple[float, float]:
    """Median |drawn colour − the colour map's top colour| (summed over RGB) at the centres of the
    lesion patches and of all the others, in an overlay of sample slide_01 drawn at --max-side 1000."""
    from smcli.heatmap import PAD, TITLE_H, colour_map, lookup_table
    from smcli.slide import crop_box, thumbnail_size

    bag = load_bag(SAMPLES / "slide_01.safetensors")
    with openslide.OpenSlide(str(slide)) as handle:
        size = handle.dimensions
    coords = bag.coords.astype(np.float64)
    x0, y0, x1, y1 = crop_box(coords, (512.0, 512.0), size) if crop else (0, 0, *size)
    width, height = thumbnail_size(x1 - x0, y1 - y0, 1000)
    centres = ((coords + 256 - (x0, y0)) / ((x1 - x0) / width, (y1 - y0) / height)).astype(int)  # (N, 2)
    image = np.asarray(Image.open(png).convert("RGB")).astype(int)
    drawn = image[TITLE_H + centres[:, 1], PAD + centres[:, 0]]  # (N, 3)
    distance = np.abs(drawn - lookup_table(colour_map("inferno"))[-1]).sum(axis=1)
    lesion = bag.labels == 1
    return float(np.median(distance[lesion])), float(np.median(distance[~lesion]))


def test_the_lesion_is_the_hottest_region_at_a_glance(sample_slide, tmp_path):
    """Sm-ABMIL ranks the lesion highest; the default overlay must show it in the hottest colour.
    A fixed 40 % blend (the old default) mixed the pale top colour with the dark lesion stain into
    grey-brown, further from the top colour than the tissue around it: this test fails on it."""
    draw = [
        "heatmap",
        str(SAMPLES / "slide_01.safetensors"),
        "-m",
        str(SAMPLES / "models/sm_abmil.safetensors"),
    ]
    draw += ["--slide", str(sample_slide), "--max-side", "1000"]
    runner = CliRunner()
    assert runner.invoke(app, [*draw, "-o", str(tmp_path / "new.png")]).exit_code == 0
    lesion, rest = lesion_and_rest_distance(tmp_path / "new.png", sample_slide, crop=True)
    assert lesion < 0.6 * rest
    old = [*draw, "-o", str(tmp_path / "old.png"), "--alpha", "0.4", "--no-crop"]
    assert runner.invoke(app, old).exit_code == 0
    lesion, rest = lesion_and_rest_distance(tmp_path / "old.png", sample_slide, crop=False)
    assert lesion > 0.9 * rest  # the misleading picture the default replaced
