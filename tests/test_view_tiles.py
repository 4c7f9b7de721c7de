"""Deep Zoom geometry (the same grid as OpenSlide's generator), the bounded tile cache, and attention
tiles that stitch into exactly the picture of the whole level."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smcli.heatmap import colour_map, lookup_table
from smcli.scored import BagValues
from smcli.view import attention
from smcli.view.data import make_view_bag
from smcli.view.tiles import NoSuchTile, Pyramid, TileCache


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 200_000), st.integers(1, 200_000))
def test_pyramid_matches_openslides_deep_zoom_levels(width, height):
    pyramid = Pyramid(width, height)
    sizes = [(width, height)]  # DeepZoomGenerator's rule: halve, rounding up, down to 1 x 1
    while sizes[-1] != (1, 1):
        w, h = sizes[-1]
        sizes.append((max(1, (w + 1) // 2), max(1, (h + 1) // 2)))
    sizes.reverse()
    assert pyramid.max_level == len(sizes) - 1
    assert [pyramid.level_size(level) for level in range(len(sizes))] == sizes


def test_tiles_outside_the_pyramid_do_not_exist():
    pyramid = Pyramid(1000, 300)
    assert pyramid.tile_box(10, 3, 1) == (768, 256, 1000, 300)
    for level, col, row in [(11, 0, 0), (-1, 0, 0), (10, 4, 0), (10, 0, 2), (10, -1, 0), (0, 1, 0)]:
        with pytest.raises(NoSuchTile):
            pyramid.tile_box(level, col, row)


def test_cache_keeps_within_its_byte_limit_dropping_the_least_recently_used():
    cache = TileCache(limit=1000)
    for key in range(5):
        cache.get_or_make((key,), lambda: b"x" * 300)
    assert cache.size <= 1000 and len(cache) == 3
    assert cache.get_or_make((2,), lambda: b"new") == b"x" * 300  # kept, now most recent
    cache.get_or_make((9,), lambda: b"y" * 300)
    assert cache.get_or_make((3,), lambda: b"gone") == b"gone"  # 3 was the oldest
    assert cache.get_or_make((99,), lambda: b"z" * 5000) == b"z" * 5000  # too large: served, not kept
    assert cache.size <= 1000


def test_cache_is_safe_across_threads():
    cache = TileCache(limit=10_000)

    def work(offset):
        for i in range(500):
            cache.get_or_make(((i + offset) % 97,), lambda: b"t" * 200)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert cache.size == 200 * len(cache) <= 10_000


def grid_bag(seed: int, step: float = 48.0):
    rng = np.random.default_rng(seed)
    cells = np.unique(rng.integers(0, 40, size=(300, 2)), axis=0)
    coords = cells * step + np.array([1000.0, 500.0])
    values = rng.normal(size=cells.shape[0])
    labels = rng.random(cells.shape[0]) < 0.4
    bag = BagValues("b", Path("t.csv"), coords, values, "attention_logit", step, labels)
    return make_view_bag(0, bag, None, None)


@pytest.mark.parametrize("seed, labels", [(0, False), (1, True), (2, True)])
def test_tiles_stitch_into_the_whole_level(seed, labels):
    bag = grid_bag(seed)
    pyramid = Pyramid(*bag.size, tile=64)  # small tiles: many tile edges cross the patches
    style = attention.Style("inferno", lookup_table(colour_map("inferno")), "minmax", labels=labels)
    big = Pyramid(*bag.size, tile=4096)  # one tile holds each level whole
    for level in (pyramid.max_level, pyramid.max_level - 2, pyramid.max_level - 5):
        from io import BytesIO

        from PIL import Image

        def tile(pyr, col, row, level=level):
            return np.asarray(Image.open(BytesIO(attention.render(bag, pyr, level, col, row, style))))

        whole = tile(big, 0, 0)
        width, height = pyramid.level_size(level)
        stitched = np.zeros_like(whole)
        for row in range(-(-height // 64)):
            for col in range(-(-width // 64)):
                piece = tile(pyramid, col, row)
                stitched[row * 64 : row * 64 + piece.shape[0], col * 64 : col * 64 + piece.shape[1]] = piece
        assert (stitched == whole).all(), level
