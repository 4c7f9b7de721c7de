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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="slide seed (default 0)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="output folder (default: this folder)",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for slide in sample_set(args.seed):
        path = write_slide(slide, args.out)
        kind = f"positive, {int(slide.labels.sum())} lesion patches" if slide.positive else "negative"
        print(f"{path}  {slide.features.shape[0]} patches  {kind}  {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
