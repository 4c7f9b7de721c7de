"""Test data for `smcli view`: a small pyramidal TIFF slide, score tables of one bag, a server in-process."""

from __future__ import annotations

import contextlib
import http.client
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import tifffile

STEP = 128  # level-0 pixels per patch
WIDTH, HEIGHT = 2048, 1536  # level 0 of the test slide
TISSUE = (200, 120, 170)  # pink-purple "stain" where the bag has patches
GLASS = (248, 248, 246)


def patch_coords() -> np.ndarray:
    """(N, 2) level-0 corners: an ellipse of grid cells in the middle of the slide."""
    cells = [
        (cx, cy)
        for cx in range(WIDTH // STEP)
        for cy in range(HEIGHT // STEP)
        if ((cx - 8) / 6.5) ** 2 + ((cy - 6) / 4.5) ** 2 <= 1.0
    ]
    return np.asarray(cells, dtype=np.int64) * STEP


def write_slide(path: Path, coords: np.ndarray, levels: int = 3, tile: int = 256) -> Path:
    """A tiled RGB TIFF: tissue colour on every patch footprint, glass elsewhere; level k is 2^k
    smaller, each level its own page, the reduced ones marked subfiletype=1 (OpenSlide's generic TIFF)."""
    rgb = np.empty((HEIGHT, WIDTH, 3), dtype=np.uint8)
    rgb[:] = GLASS
    for x, y in coords:
        rgb[y : y + STEP, x : x + STEP] = TISSUE
    with tifffile.TiffWriter(path) as tif:
        level = rgb
        for index in range(levels):
            tif.write(
                level, tile=(tile, tile), compression="zlib", photometric="rgb", subfiletype=1 if index else 0
            )
            level = level[::2, ::2]
    return path


def write_table(path: Path, coords: np.ndarray, seed: int, bag_id: str = "slide_a") -> pd.DataFrame:
    """A table as `smcli score` writes it: one clear top patch, weights = softmax(logits), labels."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=coords.shape[0]).astype(np.float32)
    logits[rng.integers(coords.shape[0])] = 6.0  # the top patch, far above the rest
    weights = np.exp(logits - logits.max())
    weights = (weights / weights.sum()).astype(np.float32)
    labels = (coords[:, 0] >= 1152).astype(np.int64)
    table = pd.DataFrame(
        {
            "bag_id": bag_id,
            "instance": np.arange(coords.shape[0]),
            "x": coords[:, 0],
            "y": coords[:, 1],
            "attention_logit": logits,
            "attention_weight": weights,
            "label": labels,
        }
    )
    table.to_csv(path, index=False)
    return pd.read_csv(path)  # the numbers as any reader of the file sees them


@contextlib.contextmanager
def serving(bags, **options) -> Iterator[tuple[object, str]]:
    """The viewer on a free port, served from a thread: yields (server, url with token)."""
    from smcli.view.server import ServeOptions, start

    server, url = start(bags, ServeOptions(**options))
    worker = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    worker.start()
    try:
        yield server, url
    finally:
        server.shutdown()
        server.server_close()
        server.viewer.close()


def get(url: str, path: str, host: str | None = None, token: bool = True, headers: dict | None = None):
    """GET path (sent as is, never normalized) on the server of `url`: (status, headers, body)."""
    parts = urlsplit(url)
    token_value = parts.query.split("token=", 1)[1]
    if token:
        path += ("&" if "?" in path else "?") + f"token={token_value}"
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    sent = {"Host": host if host is not None else parts.netloc, **(headers or {})}
    connection.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
    for key, value in sent.items():
        if value is not None:
            connection.putheader(key, value)
    connection.endheaders()
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response.status, dict(response.getheaders()), body
