"""Benchmark the slide overlay: smcli's vectorized footprints against a per-patch paint loop.

Usage (from the repository root, with the project's virtualenv and the [slide,plot] extras):

    python benchmarks/overlay.py                   # 100k patches, 2000 px, median of 5 (~1 min)
    python benchmarks/overlay.py --patches 20000 --max-side 1000 --repeats 3

The report (markdown) goes to stdout, progress to stderr.

The slide: a pyramidal tiled TIFF (deflate) written to a temporary directory, level 0 of
317 x 256 = 81,152 px square (100,000 patches of 256 px on a 317 x 317 grid), levels at downsample
1, 4, 16 and 64 as pages marked subfiletype 1, like a scanner's pyramid. The levels nobody reads at
2000 px (1 and 4) are flat tiles, compressed once and written as bytes, so the file is made in
seconds; downsample 16 and 64 hold a textured image, which OpenSlide decodes for the thumbnail.

Both sides, each repeat, in this process:

* smcli: `read_thumbnail(slide, max_side)` (OpenSlide `get_thumbnail`: the level at downsample 16,
  5,072 px, resized to 2000 px), then `paint` (every patch footprint rasterized at thumbnail scale
  with np.maximum.at, one pass per pixel offset of a footprint) and `blend` (lookup-table colours,
  one vectorized mix), i.e. what `smcli heatmap --slide` computes before matplotlib lays the figure
  out. The figure (matplotlib draws the frame, colour bar and title; the map is pasted in; Pillow
  encodes the PNG) is timed separately.
* peer: the same thumbnail read, then TRIDENT's method (`create_overlay` + `apply_colormap` in
  trident/Visualization.py, re-written here from its description): for each patch, add its score
  and 1 to two full-size canvases over its rectangle (coords and size scaled and ceil-rounded);
  average where covered; colour the covered pixels with the matplotlib colour map; blend them over
  the slide (TRIDENT blends the whole frame with cv2.addWeighted, darkening patch-free areas; the
  peer blends only covered pixels, like smcli, so the outputs are comparable). The share of
  pixels whose colour differs by more than 2 levels (rounding of the footprints and of the colour
  lookup) is printed for every run.

Patches are drawn in a random order with random attention; --norm rank (what the CLI does by
default) is applied once, outside the timing. Timings are wall-clock medians over --repeats.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from smcli.heatmap import colour_map, compose, lookup_table, normalize, save_rgb  # noqa: E402
from smcli.slide import blend, paint, read_thumbnail  # noqa: E402

STEP = 256
TILE = 1024  # level-0 tile; each level's tile is TILE / downsample, at least 256 px
DOWNSAMPLES = (1, 4, 16, 64)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def write_slide(path: Path, side: int, seed: int) -> None:
    """A square pyramidal TIFF of `side` level-0 px: flat tiles at downsample 1 and 4, textured below."""
    import tifffile

    rng = np.random.default_rng(seed)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for index, factor in enumerate(DOWNSAMPLES):
            size = side // factor
            if factor <= 4:  # flat pink tiles, compressed once
                tile_side = max(256, TILE // factor)
                tile = np.empty((tile_side, tile_side, 3), dtype=np.uint8)
                tile[:] = (230, 170, 200)
                blob = zlib.compress(tile.tobytes(), 6)
                count = (-(-size // tile_side)) ** 2
                tif.write(
                    (blob for _ in range(count)),
                    shape=(size, size, 3),
                    dtype=np.uint8,
                    tile=(tile_side, tile_side),
                    compression="zlib",
                    photometric="rgb",
                    subfiletype=1 if index else 0,
                    metadata=None,
                )
                continue
            base = np.array([226, 168, 198], dtype=np.int16)
            noise = rng.integers(-25, 25, size=(size, size, 3), dtype=np.int16)
            level = np.clip(base + noise, 0, 255).astype(np.uint8)
            tif.write(
                level,
                tile=(256, 256),
                compression="zlib",
                photometric="rgb",
                subfiletype=1,
                metadata=None,
            )


def peer_overlay(thumbnail, coords, step, t, cmap, alpha) -> np.ndarray:
    """TRIDENT's create_overlay + apply_colormap method, written here: for each patch, add its score
    and 1 to two full-size canvases over its (ceil-rounded) rectangle; average; colour every covered
    pixel with the matplotlib colour map; blend those pixels over the slide."""
    pixels = thumbnail.pixels
    height, width = pixels.shape[:2]
    scale = 1.0 / np.asarray(thumbnail.scale)  # thumbnail px per level-0 px, (x, y)
    size = np.ceil(np.array([step, step]) * scale).astype(int)
    corners = np.ceil(coords * scale).astype(int)
    total = np.zeros((height, width), dtype=np.float64)
    count = np.zeros((height, width), dtype=np.uint16)
    for index, (x, y) in enumerate(corners):
        total[y : y + size[1], x : x + size[0]] += t[index]
        count[y : y + size[1], x : x + size[0]] += 1
    covered = count > 0
    mean = total[covered] / count[covered]
    colours = (cmap(mean) * 255).astype(np.uint8)[:, :3]
    out = pixels.copy()
    mixed = (1.0 - alpha) * pixels[covered].astype(np.float32) + alpha * colours
    out[covered] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    return out


def smcli_overlay(thumbnail, coords, step, t, lut, alpha) -> np.ndarray:
    canvas = paint(coords, step, t, thumbnail.pixels.shape[:2], thumbnail.scale)
    return blend(thumbnail.pixels, canvas, lut, alpha)


def write_figure(pixels: np.ndarray, t: np.ndarray, path: Path) -> None:
    """What the CLI does after the overlay: lay out the figure, draw it, paste the map, write the PNG."""
    picture = compose(pixels, normalize(t, "minmax"), colour_map("inferno"), "bench", "overlay")
    save_rgb(picture.render(), path)


def timed(function, *args):
    start = time.perf_counter()
    value = function(*args)
    return time.perf_counter() - start, value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=100_000)
    parser.add_argument("--max-side", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=0.4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    grid = int(np.ceil(np.sqrt(args.patches)))
    side = grid * STEP
    side = -(-side // (TILE * DOWNSAMPLES[-1] // 16)) * (TILE * DOWNSAMPLES[-1] // 16)
    rng = np.random.default_rng(args.seed)
    cells = np.stack(np.divmod(rng.permutation(grid * grid)[: args.patches], grid), axis=1)
    coords = cells[:, ::-1].astype(np.int64) * STEP  # (N, 2) level-0 (x, y)
    t = normalize(rng.standard_normal(args.patches), "rank").t
    cmap = colour_map("inferno")
    lut = lookup_table(cmap)

    with tempfile.TemporaryDirectory() as folder:
        slide = Path(folder) / "slide.tiff"
        start = time.perf_counter()
        write_slide(slide, side, args.seed)
        megabytes = slide.stat().st_size / 1e6
        log(f"slide {side} x {side} px, {megabytes:.0f} MB, written in {time.perf_counter() - start:.1f} s")
        read_times, smcli_times, peer_times, figure_times = [], [], [], []
        for repeat in range(args.repeats + 1):  # the first run warms caches, untimed
            read_s, thumbnail = timed(read_thumbnail, slide, args.max_side)
            ours_s, ours = timed(smcli_overlay, thumbnail, coords, STEP, t, lut, args.alpha)
            peer_s, theirs = timed(peer_overlay, thumbnail, coords, STEP, t, cmap, args.alpha)
            differ = float((np.abs(ours.astype(int) - theirs).max(axis=2) > 2).mean())
            figure_s, _ = timed(write_figure, ours, t, Path(folder) / "overlay.png")
            if repeat:
                read_times.append(read_s)
                smcli_times.append(ours_s)
                peer_times.append(peer_s)
                figure_times.append(figure_s)
            log(
                f"repeat {repeat}: read {read_s:.3f} s, smcli {ours_s:.3f} s, peer {peer_s:.3f} s, "
                f"png {figure_s:.3f} s; {differ:.2%} of pixels differ by more than 2 levels"
            )

    read = statistics.median(read_times)
    ours = statistics.median(smcli_times)
    peer = statistics.median(peer_times)
    figure = statistics.median(figure_times)
    height, width = thumbnail.pixels.shape[:2]
    print(f"Overlay benchmark: {args.patches:,} patches of {STEP} px on a {side:,} px slide,")
    print(f"thumbnail {width} x {height}")
    print(f"({os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, median of {args.repeats})\n")
    print("| step | smcli s | peer s | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| read thumbnail (OpenSlide) | {read:.3f} | {read:.3f} | |")
    print(f"| paint + blend | {ours:.3f} | {peer:.3f} | {peer / ours:.1f}× |")
    whole_ratio = (read + peer) / (read + ours)
    print(f"| read + paint + blend | {read + ours:.3f} | {read + peer:.3f} | {whole_ratio:.1f}× |")
    print(f"| figure + PNG (matplotlib) | {figure:.3f} | | |")


if __name__ == "__main__":
    main()
