"""Synthetic whole-slide bags that tell the Sm story, deterministically from a seed.

    python sample_bags/generate.py [--seed 0] [--out sample_bags]

writes SAMPLE_SLIDES (8) bags `slide_01.safetensors` ... to --out. Each bag holds

    features (N, 192) float16   "foundation-model-like" patch embeddings
    coords   (N, 2)   int64     level-0 pixel (x, y) of each patch's corner, patch step 512
    labels   (N,)     uint8     1 on lesion patches, 0 elsewhere (all 0 on negative slides)

and string metadata patch_size, bag_id, slide_label, n_lesion_patches, seed, generator.

What a slide looks like
-----------------------
* Tissue: cells of a patch grid chosen by thresholding a blobby field (a union of ellipses plus
  coarse and fine smooth noise, so borders are ragged), minus small holes, plus a few isolated
  patches away from the tissue (graph nodes without neighbours). The threshold is picked so the
  slide has exactly the requested number of patches.
* Features: a few tissue types laid out by smooth random fields (argmax), each with its own mean
  embedding; a smooth within-type drift along a few directions; per-patch anisotropic Gaussian
  noise. The "world" (type means, noise scales, lesion direction) is shared by every slide and
  fixed by `world_seed`, so a model trained on `training_set()` applies to the sample slides.
* Lesions (positive slides only): one to three compact blobs of several dozen to a few hundred
  tissue patches. Their patches get a fixed lesion direction added with amplitude
  `LESION_SNR` times the noise standard deviation along that direction (per patch, jittered):
  strong enough to be found by pooling a neighbourhood, too weak to call patches one by one, so
  un-smoothed attention is speckled while Sm-smoothed attention follows the blob.

Slide images
------------
    python sample_bags/generate.py --slide-image [--out sample_bags]

writes `slide_01.tiff` (about 20 MB, not kept in git): the whole-slide image of sample slide_01 as a
pyramidal tiled TIFF that OpenSlide opens as a generic TIFF. Level 0 is in the bag's pixel grid (a
patch at (x, y) covers [x, x + 512) × [y, y + 512)): stained-looking tissue wherever the bag has a
patch, a denser and darker texture on lesion patches, near-white glass elsewhere. Reduced levels
(downsample 8 and 32) are separate pages marked subfiletype 1. Every 512 px level-0 tile is one of
a few hundred templates (the kinds of the four patch cells it overlaps), each deflate-compressed
once per level, so writing is mostly copying bytes (a few seconds) and the file stays small.

Determinism: everything comes from numpy's PCG64 streams seeded through SeedSequence, with no
FFT or BLAS reductions in the per-slide path, and the files are written by a small safetensors
writer with sorted keys (the safetensors package serializes multi-key metadata in hash order,
which changes from process to process). The same seed gives byte-identical files on one machine;
another CPU's vectorized exp/sin may differ in the last bits.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PATCH_SIZE = 512
FEATURE_DIM = 192
N_TISSUE_TYPES = 5
N_DRIFT_DIRECTIONS = 3
WORLD_SEED = 20241028  # the embedding geometry shared by sample and training slides
LESION_SNR = 1.3  # lesion shift / noise std along the lesion direction, per patch
TYPE_SCALE = 0.9  # per-dimension std of the tissue-type mean embeddings

SAMPLE_SLIDES = 8
SAMPLE_PATCHES = (1200, 5200)  # patches per sample slide, drawn uniformly (inclusive bounds)
TRAINING_SEED = 1
TRAINING_SLIDES = 1000
TRAINING_PATCHES = (150, 400)

GENERATOR = "smcli sample_bags/generate.py v1"


# ---------------------------------------------------------------------------------------------
# the shared embedding geometry


@dataclass(frozen=True)
class World:
    """Embedding geometry shared by all slides (D = feature dimension)."""

    base: np.ndarray  # (D,) offset of every embedding
    type_means: np.ndarray  # (K, D) per tissue type
    drift: np.ndarray  # (R, D) directions of smooth within-slide variation
    noise_scale: np.ndarray  # (D,) per-dimension std of the per-patch noise
    lesion_dir: np.ndarray  # (D,) unit vector
    lesion_amplitude: float  # shift along lesion_dir for a lesion patch (before jitter)


def make_world(
    seed: int = WORLD_SEED, dim: int = FEATURE_DIM, snr: float = LESION_SNR, type_scale: float = TYPE_SCALE
) -> World:
    rng = np.random.default_rng(seed)
    lesion_dir = rng.standard_normal(dim)
    lesion_dir /= math.sqrt(float(np.sum(lesion_dir * lesion_dir)))

    def without_lesion(vectors: np.ndarray) -> np.ndarray:
        # tissue types and drifts carry no lesion signal: remove their lesion_dir component
        along = np.sum(vectors * lesion_dir, axis=-1, keepdims=True)
        return vectors - along * lesion_dir

    base = 0.3 * rng.standard_normal(dim)
    type_means = without_lesion(type_scale * rng.standard_normal((N_TISSUE_TYPES, dim)))
    drift = without_lesion(0.35 * rng.standard_normal((N_DRIFT_DIRECTIONS, dim)))
    noise_scale = np.exp(0.35 * rng.standard_normal(dim))  # anisotropic, like real embeddings
    noise_along_lesion = math.sqrt(float(np.sum((lesion_dir * noise_scale) ** 2)))
    return World(base, type_means, drift, noise_scale, lesion_dir, snr * noise_along_lesion)


# ---------------------------------------------------------------------------------------------
# fields and shapes on the patch grid


def smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """White noise blurred by a Gaussian of `sigma` cells, standardized to mean 0, std 1.

    A separable convolution written as a sum over kernel taps (no FFT), on noise drawn with a
    margin so the borders are as random as the middle.
    """
    height, width = shape
    radius = max(1, int(math.ceil(3.0 * sigma)))
    taps = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    kernel /= kernel.sum()
    noise = rng.standard_normal((height + 2 * radius, width + 2 * radius))
    rows = np.zeros((height, width + 2 * radius))
    for k, weight in enumerate(kernel):
        rows += weight * noise[k : k + height, :]
    out = np.zeros((height, width))
    for k, weight in enumerate(kernel):
        out += weight * rows[:, k : k + width]
    out -= out.mean()
    return out / out.std()


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores (ties broken by index): a deterministic threshold."""
    return np.sort(np.argsort(-scores, kind="stable")[:k])


@dataclass
class Layout:
    grid: tuple[int, int]  # (rows, cols)
    cells: np.ndarray  # (N, 2) int64 (row, col), row-major order
    isolated: np.ndarray  # (N,) bool: the stray patches away from the tissue


def tissue_layout(rng: np.random.Generator, n_patches: int) -> Layout:
    """Exactly n_patches grid cells: blobby tissue with holes and ragged borders, plus strays."""
    n_isolated = int(rng.integers(3, 9))
    n_tissue = n_patches - n_isolated
    fill = rng.uniform(0.25, 0.38)  # fraction of the grid covered by tissue
    aspect = rng.uniform(0.6, 1.6)  # cols / rows
    rows = max(8, int(round(math.sqrt(n_tissue / fill / aspect))))
    cols = max(8, int(round(n_tissue / fill / rows)))
    r, c = np.mgrid[0:rows, 0:cols].astype(np.float64)
    r, c = r / rows, c / cols  # unit square coordinates

    blob = np.full((rows, cols), -np.inf)
    for _ in range(int(rng.integers(1, 4))):  # union of 1-3 rotated ellipses
        cy, cx = rng.uniform(0.35, 0.65, size=2)
        ry, rx = rng.uniform(0.14, 0.32, size=2)
        angle = rng.uniform(0, math.pi)
        dy, dx = r - cy, c - cx
        u = (dx * math.cos(angle) + dy * math.sin(angle)) / rx
        v = (-dx * math.sin(angle) + dy * math.cos(angle)) / ry
        blob = np.maximum(blob, 1.0 - np.sqrt(u * u + v * v))
    scale = max(rows, cols)
    blob += 0.3 * smooth_field(rng, (rows, cols), sigma=scale / 8)  # lobes and bays
    blob += 0.06 * smooth_field(rng, (rows, cols), sigma=2.0)  # wavy border
    blob += 0.06 * smooth_field(rng, (rows, cols), sigma=0.7)  # ragged border
    holes = smooth_field(rng, (rows, cols), sigma=1.2)
    blob -= 2.0 * (holes > 2.1)  # small holes (a few percent of the cells)
    edge = np.minimum(np.minimum(r, 1.0 - r), np.minimum(c, 1.0 - c))
    blob -= 3.0 * np.clip(0.15 - edge, 0.0, None) ** 2 / 0.15**2  # a margin: tissue is not cut off
    tissue = np.zeros(rows * cols, dtype=bool)
    tissue[top_k(blob.reshape(-1), n_tissue)] = True
    tissue = tissue.reshape(rows, cols)

    # stray patches: cells with no tissue within 2 cells, not next to each other
    padded = np.pad(tissue, 2)
    near = np.zeros_like(tissue)
    for dy in range(5):
        for dx in range(5):
            near |= padded[dy : dy + rows, dx : dx + cols]
    candidates = np.flatnonzero(~near.reshape(-1))
    strays = np.zeros((rows, cols), dtype=bool)
    placed = 0
    for index in rng.permutation(candidates):
        y, x = divmod(int(index), cols)
        if strays[max(0, y - 1) : y + 2, max(0, x - 1) : x + 2].any():
            continue
        strays[y, x] = True
        placed += 1
        if placed == n_isolated:
            break
    if placed < n_isolated:  # (never on these grids) keep the patch count exact anyway
        extra = top_k(np.where(tissue, -np.inf, blob).reshape(-1), n_isolated - placed)
        tissue.reshape(-1)[extra] = True

    occupied = tissue | strays
    cells = np.argwhere(occupied).astype(np.int64)  # row-major, as feature extractors emit
    isolated = strays[cells[:, 0], cells[:, 1]]
    return Layout((rows, cols), cells, isolated)


def place_lesions(rng: np.random.Generator, layout: Layout, sizes: list[int]) -> np.ndarray:
    """(N,) uint8 labels: one compact blob of tissue patches per size, ragged, around holes."""
    cells = layout.cells.astype(np.float64)
    n = cells.shape[0]
    labels = np.zeros(n, dtype=np.uint8)
    ragged = smooth_field(rng, layout.grid, sigma=1.0)[layout.cells[:, 0], layout.cells[:, 1]]
    for size in sizes:
        free = np.flatnonzero(~layout.isolated & (labels == 0))
        center = cells[free[int(rng.integers(free.shape[0]))]]
        stretch = rng.uniform(0.7, 1.4)  # slightly elongated blobs
        angle = rng.uniform(0, math.pi)
        d = cells[free] - center
        u = (d[:, 1] * math.cos(angle) + d[:, 0] * math.sin(angle)) / stretch
        v = (-d[:, 1] * math.sin(angle) + d[:, 0] * math.cos(angle)) * stretch
        radius = math.sqrt(size / math.pi)
        score = -np.sqrt(u * u + v * v) / radius + 0.3 * ragged[free]
        labels[free[top_k(score, min(size, free.shape[0]))]] = 1
    return labels


def patch_features(rng: np.random.Generator, world: World, layout: Layout, labels: np.ndarray) -> np.ndarray:
    """(N, D) float16 embeddings: tissue type mean + smooth drift + noise (+ lesion shift)."""
    rows, cols = layout.grid
    at = (layout.cells[:, 0], layout.cells[:, 1])
    scale = max(rows, cols)
    prevalence = rng.normal(0.0, 0.5, size=N_TISSUE_TYPES)
    type_scores = np.stack(
        [smooth_field(rng, layout.grid, sigma=scale / 10)[at] + prevalence[k] for k in range(N_TISSUE_TYPES)]
    )
    types = np.argmax(type_scores, axis=0)  # (N,) spatially coherent tissue types
    x = world.base + world.type_means[types]  # (N, D)
    for direction in world.drift:
        x += smooth_field(rng, layout.grid, sigma=scale / 6)[at][:, None] * direction
    x += rng.standard_normal(x.shape) * world.noise_scale
    strength = world.lesion_amplitude * (1.0 + 0.25 * rng.standard_normal(x.shape[0]))
    x += (labels * strength)[:, None] * world.lesion_dir
    return x.astype(np.float16)


# ---------------------------------------------------------------------------------------------
# slides


@dataclass
class Slide:
    name: str
    features: np.ndarray  # (N, D) float16
    coords: np.ndarray  # (N, 2) int64 level-0 (x, y)
    labels: np.ndarray  # (N,) uint8
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def positive(self) -> bool:
        return bool(self.labels.any())


def lesion_sizes(rng: np.random.Generator, n_patches: int) -> list[int]:
    """1-3 lesions of several dozen to a few hundred patches (at most ~25% of the slide)."""
    count = int(rng.integers(1, 4))
    budget = max(40, n_patches // 4)
    fractions = np.exp(rng.uniform(math.log(0.01), math.log(0.07), size=count))  # log-uniform
    sizes = [int(np.clip(round(n_patches * f), 30, 400)) for f in fractions]
    while sum(sizes) > budget and len(sizes) > 1:
        sizes.pop()
    return sizes


def make_slide(seed: int, index: int, n_patches: int, positive: bool, name: str, world: World) -> Slide:
    """One slide; (seed, index) alone decide its random streams."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    layout = tissue_layout(rng, n_patches)
    sizes = lesion_sizes(rng, n_patches) if positive else []
    labels = place_lesions(rng, layout, sizes)
    features = patch_features(rng, world, layout, labels)
    origin = rng.integers(2, 40, size=2) * PATCH_SIZE + rng.integers(0, PATCH_SIZE, size=2)
    coords = layout.cells[:, ::-1] * PATCH_SIZE + origin  # (x, y) = (col, row) * step + origin
    metadata = {
        "bag_id": name,
        "generator": GENERATOR,
        "n_lesion_patches": str(int(labels.sum())),
        "patch_size": str(PATCH_SIZE),
        "seed": str(seed),
        "slide_label": "1" if positive else "0",
    }
    return Slide(name, features, coords.astype(np.int64), labels, metadata)


def _plan(seed: int, n_slides: int, patches: tuple[int, int]) -> tuple[list[int], list[bool]]:
    """Slide sizes and labels: exactly half positive (rounded down), in a seeded order."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 10**6]))
    sizes = [int(s) for s in rng.integers(patches[0], patches[1] + 1, size=n_slides)]
    positive = np.zeros(n_slides, dtype=bool)
    positive[rng.permutation(n_slides)[: n_slides // 2]] = True
    return sizes, [bool(p) for p in positive]


def sample_set(seed: int = 0, n_slides: int = SAMPLE_SLIDES, world: World | None = None) -> list[Slide]:
    """The committed sample slides (slide_01 ... slide_08 for the defaults)."""
    world = world or make_world()
    sizes, positive = _plan(seed, n_slides, SAMPLE_PATCHES)
    return [make_slide(seed, i, sizes[i], positive[i], f"slide_{i + 1:02d}", world) for i in range(n_slides)]


def training_set(
    seed: int = TRAINING_SEED,
    n_slides: int = TRAINING_SLIDES,
    patches: tuple[int, int] = TRAINING_PATCHES,
    world: World | None = None,
) -> list[Slide]:
    """A separate, in-memory training set: smaller slides, same world, its own seed."""
    world = world or make_world()
    sizes, positive = _plan(seed, n_slides, patches)
    return [make_slide(seed, i, sizes[i], positive[i], f"train_{i:03d}", world) for i in range(n_slides)]


# ---------------------------------------------------------------------------------------------
# writing


SAFETENSORS_DTYPES = {"float16": "F16", "float32": "F32", "int64": "I64", "uint8": "U8"}


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """A safetensors file with a canonical header (sorted keys, no spaces), written atomically.

    Tensors are laid out by decreasing item size, then name, so every tensor is aligned.
    """
    header: dict[str, object] = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
    blobs = []
    offset = 0
    for name in sorted(tensors, key=lambda key: (-tensors[key].dtype.itemsize, key)):
        array = np.ascontiguousarray(tensors[name])
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        data = array.tobytes()
        header[name] = {
            "data_offsets": [offset, offset + len(data)],
            "dtype": SAFETENSORS_DTYPES[array.dtype.name],
            "shape": list(array.shape),
        }
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(len(text).to_bytes(8, "little"))
        handle.write(text)
        for data in blobs:
            handle.write(data)
    os.replace(tmp, path)


def write_slide(slide: Slide, out: Path) -> Path:
    path = Path(out) / f"{slide.name}.safetensors"
    tensors = {"features": slide.features, "coords": slide.coords, "labels": slide.labels}
    write_safetensors(path, tensors, slide.metadata)
    return path


# ---------------------------------------------------------------------------------------------
# slide images (tifffile, a test/dev dependency, is imported only here)

SLIDE_IMAGES = ("slide_01",)
TIFF_TILE = 512  # level-0 tile side = the patch step, so a tile overlaps at most 2 x 2 patch cells
LEVEL_DOWNSAMPLES = (1, 8, 32)
GLASS, LESION = 0, 1  # cell kinds; tissue cells are kinds 2, 3, 4 (three stain tints)
KINDS = 5
GLASS_RGB = (243, 241, 245)
STROMA_RGB = ((236, 176, 204), (226, 160, 196), (240, 190, 212))  # eosin pinks, one per tissue tint
NUCLEUS_RGB = (126, 62, 150)  # haematoxylin purple
LESION_RGB, LESION_NUCLEUS_RGB = (200, 128, 186), (72, 28, 112)


def texture(kind: int) -> np.ndarray:
    """(TIFF_TILE, TIFF_TILE, 3) uint8 level-0 texture of one kind of cell.

    Nuclei sit on a lattice whose period divides the tile (16 px, 8 px and darker in a lesion), so
    the texture is the same in every tile and deflate finds each row again within its 32 KB window.
    """
    y, x = np.mgrid[0:TIFF_TILE, 0:TIFF_TILE]
    out = np.empty((TIFF_TILE, TIFF_TILE, 3), dtype=np.uint8)
    if kind == GLASS:
        out[:] = GLASS_RGB
        return out
    if kind == LESION:
        period, radius, base, nucleus = 8, 3.0, LESION_RGB, LESION_NUCLEUS_RGB
    else:
        period, radius, base, nucleus = 16, 3.5, STROMA_RGB[kind - 2], NUCLEUS_RGB
    dy, dx = y % period - period / 2 + 0.5, x % period - period / 2 + 0.5
    out[:] = base
    out[dy * dy + dx * dx <= radius * radius] = nucleus
    return out


def cell_kinds(slide: Slide, seed: int = 0) -> tuple[np.ndarray, tuple[int, int]]:
    """(rows, cols) uint8 kind per patch cell (glass, lesion, or one of three tissue tints laid out
    by a smooth random field), and the level-0 (x, y) of cell (0, 0)."""
    origin = slide.coords.min(axis=0)
    cells = (slide.coords - origin) // PATCH_SIZE  # (N, 2) (col, row)
    shape = (int(cells[:, 1].max()) + 1, int(cells[:, 0].max()) + 1)
    tint = smooth_field(np.random.default_rng(np.random.SeedSequence([seed, 7])), shape, sigma=3.0)
    tissue = 2 + np.digitize(tint, [-0.5, 0.5]).astype(np.uint8)  # (rows, cols) in 2..4
    kinds = np.zeros(shape, dtype=np.uint8)
    at = (cells[:, 1], cells[:, 0])
    kinds[at] = np.where(slide.labels == 1, LESION, tissue[at])
    return kinds, (int(origin[0]), int(origin[1]))


def write_slide_image(slide: Slide, path: Path, margin: int = 4 * PATCH_SIZE) -> Path:
    """The slide's pyramidal tiled TIFF (see the module docstring), written atomically."""
    import zlib

    import tifffile

    kinds, (ox, oy) = cell_kinds(slide)
    rows, cols = kinds.shape
    span = np.array([ox + cols * PATCH_SIZE + margin, oy + rows * PATCH_SIZE + margin])
    width, height = (-(-span // TIFF_TILE) * TIFF_TILE).tolist()  # whole tiles: every level has the same grid
    tiles_x, tiles_y = width // TIFF_TILE, height // TIFF_TILE
    # the patch cells each tile overlaps: tile (ty, tx) is split at (ox % 512, oy % 512) into quadrants
    split_x, split_y = ox % PATCH_SIZE, oy % PATCH_SIZE
    first_col = (np.arange(tiles_x) * TIFF_TILE - ox) // PATCH_SIZE - (split_x == 0)
    first_row = (np.arange(tiles_y) * TIFF_TILE - oy) // PATCH_SIZE - (split_y == 0)
    padded = np.pad(kinds, 1).astype(np.int64)  # glass around the grid (index + 1 below); keys reach 624

    def kind_at(r: np.ndarray, c: np.ndarray) -> np.ndarray:
        inside = (r >= -1) & (r <= rows) & (c >= -1) & (c <= cols)
        return np.where(inside, padded[np.clip(r + 1, 0, rows + 1), np.clip(c + 1, 0, cols + 1)], GLASS)

    r0, c0 = np.meshgrid(first_row, first_col, indexing="ij")  # (tiles_y, tiles_x)
    keys = ((kind_at(r0, c0) * KINDS + kind_at(r0, c0 + 1)) * KINDS + kind_at(r0 + 1, c0)) * KINDS + kind_at(
        r0 + 1, c0 + 1
    )  # (tiles_y, tiles_x): the kinds of the 2 x 2 cells, top-left to bottom-right, in base KINDS
    textures = [texture(kind) for kind in range(KINDS)]

    def template(key: int) -> np.ndarray:
        tl, tr, bl, br = key // KINDS**3, key // KINDS**2 % KINDS, key // KINDS % KINDS, key % KINDS
        tile = np.empty_like(textures[0])
        tile[:split_y, :split_x] = textures[tl][:split_y, :split_x]
        tile[:split_y, split_x:] = textures[tr][:split_y, split_x:]
        tile[split_y:, :split_x] = textures[bl][split_y:, :split_x]
        tile[split_y:, split_x:] = textures[br][split_y:, split_x:]
        return tile

    full = {int(key): template(int(key)) for key in np.unique(keys)}
    tmp = path.with_name(f".{path.name}.tmp")
    with tifffile.TiffWriter(tmp) as tif:
        for index, factor in enumerate(LEVEL_DOWNSAMPLES):
            side = TIFF_TILE // factor
            blobs = {}
            for key, tile in full.items():
                small = tile.reshape(side, factor, side, factor, 3).mean(axis=(1, 3))
                blobs[key] = zlib.compress(np.rint(small).astype(np.uint8).tobytes(), 6)
            tif.write(
                (blobs[int(key)] for key in keys.reshape(-1)),
                shape=(height // factor, width // factor, 3),
                dtype=np.uint8,
                tile=(side, side),
                compression="zlib",
                photometric="rgb",
                subfiletype=1 if index else 0,
                metadata=None,
            )
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="slide seed (default 0)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="output folder (default: this folder)",
    )
    parser.add_argument(
        "--slide-image",
        action="store_true",
        help=f"write the slide image(s) {', '.join(SLIDE_IMAGES)}.tiff instead of the bags",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.slide_image:
        for slide in sample_set(args.seed):
            if slide.name in SLIDE_IMAGES:
                path = write_slide_image(slide, args.out / f"{slide.name}.tiff")
                print(f"{path}  {path.stat().st_size / 1e6:.1f} MB")
        return
    for slide in sample_set(args.seed):
        path = write_slide(slide, args.out)
        kind = f"positive, {int(slide.labels.sum())} lesion patches" if slide.positive else "negative"
        print(f"{path}  {slide.features.shape[0]} patches  {kind}  {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
