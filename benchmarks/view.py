"""Benchmark `smcli view` on a 100k-patch bag over an 81,152 px pyramidal TIFF.

Usage (from the repository root, with the project's virtualenv, the [slide,plot] extras and, for
the browser figure, Playwright + /usr/bin/chromium as .ci/run installs them):

    python benchmarks/view.py                    # 100k patches, ~2 min, 2 GB of slide in a temp dir
    python benchmarks/view.py --patches 20000 --keep /tmp/viewbench   # reuse the slide next time

The report (markdown) goes to stdout, progress to stderr. What is measured, against the targets
of issue 17 (2 cores):

* start: launch of `smcli view TABLE --slide SLIDE --no-browser` (a subprocess, as a user runs
  it) until the URL is printed — reading the 100k-row table and opening the slide.
* first screen: from the URL printed until headless Chromium shows the page with every slide and
  attention tile of the first view drawn (`smcliView.loaded()`); target <= 2 s.
* tile + attention layer: a Deep Zoom tile of the slide and its attention tile, requested
  together over two connections (as the browser does), time until both have arrived; cold (tiles
  never asked for, random places on the tissue, levels from whole-tissue to full resolution) and
  warm (the same tiles again: the server's tile cache); p50 / p95; targets p95 <= 300 ms cold,
  <= 100 ms warm.
* 4 clients: four threads, each its own random walk of cold tile pairs at once (four browser
  tabs); p95 and failures.
* server peak RSS: VmHWM of the server process at the end.

The slide: level 0 is 317 x 256 = 81,152 px square (100,000 patches of 256 px on a 317 x 317
grid), levels at downsample 1, 4, 16, 64 as pages marked subfiletype 1. Level-0 tiles are drawn
from 16 textured templates (pink stroma with dark nuclei), each zlib-compressed once and written
as bytes, so the 2 GB file is made in ~20 s while every read still inflates a textured tile.
"""

from __future__ import annotations

import argparse
import http.client
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

PATCH = 256
TIFF_TILE = 256
DOWNSAMPLES = (1, 4, 16, 64)
TEMPLATES = 16


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def template_tiles(rng: np.random.Generator, side: int) -> list[np.ndarray]:
    """Textured tissue tiles: pink stroma, a few dozen dark round nuclei, some grain."""
    yy, xx = np.mgrid[0:side, 0:side]
    tiles = []
    for _ in range(TEMPLATES):
        tile = np.empty((side, side, 3), dtype=np.int16)
        tile[:] = (226, 168, 198)
        tile += rng.integers(-6, 7, size=(side, side, 1), dtype=np.int16) * 2
        for _ in range(rng.integers(20, 60)):
            cx, cy, radius = rng.integers(0, side), rng.integers(0, side), rng.integers(3, 9)
            inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
            tile[inside] = (92, 54, 130)
        tiles.append(np.clip(tile, 0, 255).astype(np.uint8))
    return tiles


def write_slide(path: Path, side: int, seed: int) -> None:
    import tifffile

    rng = np.random.default_rng(seed)
    full = template_tiles(rng, TIFF_TILE)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for index, factor in enumerate(DOWNSAMPLES):
            size = side // factor
            count = (-(-size // TIFF_TILE)) ** 2
            # each level's tiles: the templates shrunk by `factor` and tiled factor x factor
            blobs = []
            for tile in full:
                side_small = TIFF_TILE // factor
                small = tile.reshape(side_small, factor, side_small, factor, 3).mean(axis=(1, 3))
                mosaic = np.tile(np.rint(small).astype(np.uint8), (factor, factor, 1))
                blobs.append(zlib.compress(mosaic.tobytes(), 6))
            order = rng.integers(0, TEMPLATES, size=count)
            tif.write(
                (blobs[i] for i in order),
                shape=(size, size, 3),
                dtype=np.uint8,
                tile=(TIFF_TILE, TIFF_TILE),
                compression="zlib",
                photometric="rgb",
                subfiletype=1 if index else 0,
                metadata=None,
            )


def write_table(path: Path, patches: int, seed: int) -> tuple[np.ndarray, int]:
    """A score table of `patches` patches on a square grid, a hot blob of attention; returns coords, side."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    cells_side = int(np.ceil(np.sqrt(patches)))
    grid = np.meshgrid(np.arange(cells_side), np.arange(cells_side), indexing="xy")
    cells = np.stack(grid, -1).reshape(-1, 2)
    cells = cells[:patches]
    centre = cells.mean(axis=0) * 0.7
    distance = np.linalg.norm(cells - centre, axis=1) / cells_side
    logits = (rng.normal(size=patches) - 12 * distance).astype(np.float32)
    weights = np.exp(logits - logits.max())
    weights = (weights / weights.sum()).astype(np.float32)
    coords = cells * PATCH
    pd.DataFrame(
        {
            "bag_id": "bench",
            "instance": np.arange(patches),
            "x": coords[:, 0],
            "y": coords[:, 1],
            "attention_logit": logits,
            "attention_weight": weights,
            "label": (distance < 0.1).astype(np.int64),
        }
    ).to_csv(path, index=False)
    return coords, cells_side * PATCH


class Client:
    """One keep-alive connection to the server (a browser holds a few)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port
        self.token = parts.query.split("token=")[1]
        self.connection = http.client.HTTPConnection(self.host, self.port, timeout=60)

    def get(self, path: str) -> bytes:
        separator = "&" if "?" in path else "?"
        self.connection.request("GET", f"{path}{separator}token={self.token}")
        response = self.connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"{path}: HTTP {response.status}")
        return body


def tile_pair(clients: tuple[Client, Client], level: int, col: int, row: int) -> float:
    """Seconds until the slide tile and its attention tile have both arrived (two connections)."""
    errors: list[Exception] = []

    def fetch(client: Client, path: str) -> None:
        try:
            client.get(path)
        except Exception as err:  # counted, reported
            errors.append(err)

    start = time.perf_counter()
    layer = f"/api/bags/0/attention/{level}/{col}_{row}.png?cmap=inferno&scale=rank&fade=1"
    other = threading.Thread(target=fetch, args=(clients[1], layer))
    other.start()
    fetch(clients[0], f"/api/bags/0/slide/{level}/{col}_{row}.jpeg")
    other.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - start


def random_tiles(rng: random.Random, side: int, count: int, max_level: int) -> list[tuple[int, int, int]]:
    """Tiles on the tissue at levels from 'whole tissue in a screen' to full resolution, unique."""
    chosen: set[tuple[int, int, int]] = set()
    while len(chosen) < count:
        level = rng.randint(max_level - 7, max_level)
        factor = 2 ** (max_level - level)
        tiles = max(1, -(-side // (factor * TIFF_TILE)))
        chosen.add((level, rng.randrange(tiles), rng.randrange(tiles)))
    return list(chosen)


def percentiles(seconds: list[float]) -> str:
    ms = sorted(s * 1000 for s in seconds)
    p95 = ms[min(len(ms) - 1, int(round(0.95 * (len(ms) - 1))))]
    return f"p50 {statistics.median(ms):.0f} ms, p95 {p95:.0f} ms, max {ms[-1]:.0f} ms (n = {len(ms)})"


def first_screen(url: str) -> float | None:
    """Seconds from opening the URL until every layer of the first view is drawn, in headless Chromium."""
    if not Path("/usr/bin/chromium").exists():
        return None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 850})
        page.goto("about:blank")
        start = time.perf_counter()
        page.goto(url)
        while not page.evaluate("window.smcliView && window.smcliView.loaded()"):
            time.sleep(0.01)
        elapsed = time.perf_counter() - start
        browser.close()
    return elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=100_000)
    parser.add_argument("--tiles", type=int, default=200, help="cold tile pairs to time")
    parser.add_argument("--keep", type=Path, help="folder for the slide and table (reused when there)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    folder = args.keep or Path(tempfile.mkdtemp(prefix="smcli-viewbench-"))
    folder.mkdir(parents=True, exist_ok=True)
    table, slide = folder / "bench.csv", folder / f"bench_{args.patches}.tiff"
    coords, side = write_table(table, args.patches, args.seed)
    if not slide.exists():
        log(f"writing {slide} ...")
        started = time.perf_counter()
        write_slide(slide, side, args.seed)
        log(f"  {slide.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - started:.0f} s")
    load_before = os.getloadavg()

    command = [sys.executable, "-m", "smcli", "view", str(table), "--slide", str(slide), "--no-browser"]
    launched = time.perf_counter()
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert server.stdout is not None
    url = server.stdout.readline().strip()
    start_s = time.perf_counter() - launched
    if not url.startswith("http"):
        server.kill()
        raise SystemExit(f"server did not start: {server.stderr.read() if server.stderr else ''}")
    try:
        screen_s = first_screen(url)
        max_level = int(np.ceil(np.log2(side)))
        rng = random.Random(args.seed)
        pairs = random_tiles(rng, side, args.tiles, max_level)
        clients = (Client(url), Client(url))
        cold = [tile_pair(clients, *tile) for tile in pairs]
        warm = [tile_pair(clients, *tile) for tile in pairs]

        concurrent: list[float] = []
        failures: list[str] = []

        def tab(seed: int) -> None:
            own = (Client(url), Client(url))
            for tile in random_tiles(random.Random(1000 + seed), side, args.tiles // 2, max_level):
                try:
                    concurrent.append(tile_pair(own, *tile))
                except Exception as err:
                    failures.append(str(err))

        tabs = [threading.Thread(target=tab, args=(n,)) for n in range(4)]
        for thread in tabs:
            thread.start()
        for thread in tabs:
            thread.join()
        status = Path(f"/proc/{server.pid}/status").read_text()
        peak_kb = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
    finally:
        server.send_signal(signal.SIGINT)
        server.communicate(timeout=30)
    load_after = os.getloadavg()
    if args.keep is None:
        shutil.rmtree(folder, ignore_errors=True)

    print(f"### smcli view: {args.patches:,} patches on a {side:,} px square pyramidal TIFF\n")
    print("| measure | result | target |")
    print("|---|---|---|")
    print(f"| start (launch to URL printed) | {start_s:.2f} s | |")
    screen = f"{screen_s:.2f} s" if screen_s is not None else "(no Chromium)"
    print(f"| first screen (URL to all tiles drawn, headless Chromium) | {screen} | <= 2 s |")
    print(f"| tile + attention, cold | {percentiles(cold)} | p95 <= 300 ms |")
    print(f"| tile + attention, warm | {percentiles(warm)} | p95 <= 100 ms |")
    print(f"| 4 clients at once, cold | {percentiles(concurrent)}, {len(failures)} failed | all served |")
    print(f"| server peak RSS | {peak_kb / 1024:.0f} MB | bounded |")
    print(
        f"\nmachine: {os.cpu_count()} CPUs, load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after (1 min)"
    )
    if failures:
        print(f"failures: {failures[:3]}")


if __name__ == "__main__":
    main()
