"""`smcli view`'s server driven in-process: the gates (token, Host), no path traversal, the tile and
patch-data endpoints, and numbers equal to the score table's."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from smcli.errors import UsageError
from smcli.geojson import rank_percentile
from smcli.heatmap import colour_map, lookup_table
from smcli.view.data import ViewBag, ViewRequest, load_bags
from tests.view_support import (
    GLASS,
    HEIGHT,
    STEP,
    TISSUE,
    WIDTH,
    get,
    patch_coords,
    serving,
    write_slide,
    write_table,
)

LUT = lookup_table(colour_map("inferno"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("view")
    coords = patch_coords()
    slide = write_slide(folder / "slide_a.tiff", coords)
    linked = folder / "linked" / "slide_a.tiff"  # a slide given as a symlink, as on clusters
    linked.parent.mkdir()
    linked.symlink_to(slide)
    (folder / "sm").mkdir()
    (folder / "abmil").mkdir()
    sm = write_table(folder / "sm" / "slide_a.csv", coords, seed=1)
    abmil = write_table(folder / "abmil" / "slide_a.csv", coords, seed=2)
    return {"folder": folder, "slide": linked, "sm": sm, "abmil": abmil, "coords": coords}


def bags_of(*inputs, slide=None) -> list[ViewBag]:
    loaded = list(load_bags(ViewRequest(list(inputs), slide=slide)))
    assert all(isinstance(bag, ViewBag) for bag in loaded), loaded
    return loaded  # type: ignore[return-value]


@pytest.fixture(scope="module")
def server(files):
    folder = files["folder"]
    bags = bags_of(folder / "sm" / "slide_a.csv", folder / "abmil" / "slide_a.csv", slide=files["slide"])
    with serving(bags, allow_hosts=("viewer.lab",)) as (running, url):
        yield url


@pytest.fixture(scope="module")
def grid_server(files):
    with serving(bags_of(files["folder"] / "sm" / "slide_a.csv")) as (running, url):
        yield url


def png(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body)))


def test_the_printed_url_is_local_with_a_long_random_token(server):
    assert server.startswith("http://127.0.0.1:")
    token = server.split("token=", 1)[1]
    assert len(token) >= 30


def test_without_the_token_every_path_is_forbidden(server):
    for path in ("/", "/api/bags", "/api/bags/0/top", "/static/viewer.js", "/nope"):
        status, _, body = get(server, path, token=False)
        assert status == 403, path
        assert b"token" in body
    status, _, _ = get(server, "/?token=not-the-token", token=False)
    assert status == 403


def test_the_token_url_sets_a_cookie_the_page_then_uses(server):
    status, headers, body = get(server, "/")
    assert status == 200 and b"smcli view" in body
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    pair = cookie.split(";", 1)[0]
    status, _, body = get(server, "/api/bags", token=False, headers={"Cookie": pair})
    assert status == 200 and json.loads(body)["bags"]
    forged = pair.split("=", 1)[0] + "=forged"
    assert get(server, "/api/bags", token=False, headers={"Cookie": forged})[0] == 403


@pytest.mark.parametrize(
    "host, status",
    [
        (None, "self"),
        ("127.0.0.1", 200),
        ("localhost:9", 200),
        ("[::1]:80", 200),
        ("viewer.lab", 200),  # --allow-host
        ("evil.example", 403),  # DNS rebinding: a name pointing at 127.0.0.1
        ("127.0.0.1.evil.example", 403),
        ("localhost:abc", 403),
        ("", 403),
    ],
)
def test_host_header_allow_list(server, host, status):
    got, _, _ = get(server, "/api/bags", host=host)
    assert got == (200 if status == "self" else status)


@pytest.mark.parametrize(
    "path",
    [
        "/static/../server.py",
        "/static/%2e%2e/server.py",
        "/static/%2E%2E%2Fserver.py",
        "/static/..%2fserver.py",
        "/static//etc/passwd",
        "/static/openseadragon/../../server.py",
        "/%2e%2e/%2e%2e/etc/passwd",
        "//etc/passwd",
        "/etc/passwd",
        "/api/bags/0/../../../etc/passwd",
        "/static/viewer.js/..",
        "/static/",
        "/api/bags/0/slide/../0_0.jpeg",
        "/api/bags/9/top",
    ],
)
def test_no_url_becomes_a_path(server, path):
    status, _, body = get(server, path)
    assert status == 404, (path, body)


def test_shipped_assets_and_licence_are_served(server):
    for name, kind in [
        ("openseadragon/openseadragon.min.js", "text/javascript"),
        ("openseadragon/LICENSE.txt", "text/plain"),
        ("viewer.js", "text/javascript"),
        ("openseadragon/images/zoomin_rest.png", "image/png"),
    ]:
        status, headers, body = get(server, f"/static/{name}")
        assert status == 200 and headers["Content-Type"].startswith(kind) and body
    status, headers, _ = get(server, "/")
    assert "default-src 'self'" in headers["Content-Security-Policy"]


def test_bag_list_names_both_tables_and_the_slide(server, files):
    bags = json.loads(get(server, "/api/bags")[2])["bags"]
    assert [bag["source"] for bag in bags] == ["sm/slide_a.csv", "abmil/slide_a.csv"]
    assert {bag["bag_id"] for bag in bags} == {"slide_a"}
    assert bags[0]["slide"] == "slide_a.tiff"
    assert (bags[0]["width"], bags[0]["height"]) == (WIDTH, HEIGHT)
    assert bags[0]["patches"] == len(files["coords"])


def test_hover_gives_the_tables_numbers(server, files):
    table = files["sm"]
    for row in (0, 7, int(table["attention_logit"].idxmax())):
        x, y = int(table.x[row]), int(table.y[row])
        status, _, body = get(server, f"/api/bags/0/patch?x={x + STEP / 2}&y={y + 0.5}")
        record = json.loads(body)
        assert status == 200
        assert (record["instance"], record["x"], record["y"]) == (int(table.instance[row]), x, y)
        assert record["attention_logit"] == table.attention_logit[row]  # exact: same double
        assert record["attention_weight"] == table.attention_weight[row]
        assert record["label"] == table.label[row]
        expected = rank_percentile(table.attention_logit.to_numpy())[row]
        assert record["attention_percentile"] == pytest.approx(expected, abs=1e-12)
    assert json.loads(get(server, "/api/bags/0/patch?x=1&y=1")[2]) is None  # glass
    assert get(server, "/api/bags/0/patch?x=abc&y=1")[0] == 400


def test_top_list_is_the_table_sorted(server, files):
    table = files["sm"]
    records = json.loads(get(server, "/api/bags/0/top?k=5")[2])
    expected = table.sort_values("attention_logit", ascending=False, kind="stable").head(5)
    assert [r["instance"] for r in records] == expected.instance.tolist()
    assert [r["attention_logit"] for r in records] == expected.attention_logit.tolist()
    assert [r["rank"] for r in records] == [1, 2, 3, 4, 5]


def test_slide_tiles_are_the_slides_pixels(server):
    status, headers, body = get(server, "/api/bags/0/slide/11/4_3.jpeg")  # level 11 = full size
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    tile = png(body).astype(int)
    assert tile.shape == (256, 256, 3)
    assert np.abs(tile[128, 128] - TISSUE).max() < 12  # (1024 + 128, 768 + 128) is in the ellipse
    corner = png(get(server, "/api/bags/0/slide/11/0_0.jpeg")[2]).astype(int)
    assert np.abs(corner[5, 5] - GLASS).max() < 12
    assert get(server, "/api/bags/0/slide/11/8_0.jpeg")[0] == 404  # 2048 / 256 = 8 columns: 0..7
    assert get(server, "/api/bags/0/slide/12/0_0.jpeg")[0] == 404


def test_attention_tiles_sit_on_the_footprints_at_full_size(server, files):
    table = files["sm"]
    top = int(table.attention_logit.idxmax())
    x, y = int(table.x[top]), int(table.y[top])
    col, row = x // 256, y // 256
    status, headers, body = get(server, f"/api/bags/0/attention/11/{col}_{row}.png?cmap=inferno&scale=rank")
    assert status == 200 and headers["Content-Type"] == "image/png"
    tile = png(body)
    assert tile.shape == (256, 256, 4)
    left, top_edge = x - col * 256, y - row * 256
    patch = tile[top_edge : top_edge + STEP, left : left + STEP]
    assert (patch[..., :3] == LUT[-1]).all() and (patch[..., 3] == 255).all()  # rank 100 %: the top colour
    glass = png(get(server, "/api/bags/0/attention/11/0_0.png")[2])
    assert (glass[..., 3] == 0).all()  # no patch: fully transparent


def test_every_zoom_level_renders_and_the_whole_slide_level_shows_all_patches(server, files):
    for level in range(12):
        assert get(server, f"/api/bags/0/attention/{level}/0_0.png")[0] == 200
    whole = png(get(server, "/api/bags/0/attention/8/0_0.png")[2])  # 256 x 192: 1/8 of level 0
    assert whole.shape == (192, 256, 4)
    painted = whole[..., 3] > 0
    expected = np.zeros_like(painted)
    for x, y in files["coords"] // 8:
        expected[y : y + STEP // 8, x : x + STEP // 8] = True
    assert (painted == expected).all()


def test_fade_makes_opacity_grow_with_the_value(server, files):
    faded = png(get(server, "/api/bags/0/attention/8/0_0.png?fade=1&scale=minmax")[2])
    table = files["sm"]
    top = int(table.attention_logit.idxmax())
    low = int(table.attention_logit.idxmin())
    alpha_at = lambda row: faded[int(table.y[row]) // 8 + 2, int(table.x[row]) // 8 + 2, 3]  # noqa: E731
    assert alpha_at(top) == 255
    assert alpha_at(low) == round(255 * 0.15 / 0.9)  # at the page's 90 %: 0.15, as heatmap's overlay


def test_raw_scale_with_a_fixed_range_and_colour_map(server, files):
    body = get(server, "/api/bags/0/attention/8/0_0.png?scale=raw&vmin=-100&vmax=100&cmap=viridis")[2]
    tile = png(body)
    viridis = lookup_table(colour_map("viridis"))
    table = files["sm"]
    for row in range(0, len(table), 7):
        x, y, logit = int(table.x[row]) // 8, int(table.y[row]) // 8, float(table.attention_logit[row])
        expected = viridis[int(np.rint((logit + 100) / 200 * 255))]  # fixed range, not the bag's
        assert (tile[y + 4, x + 4, :3] == expected).all()
    assert get(server, "/api/bags/0/attention/8/0_0.png?scale=raw&vmin=1&vmax=1")[0] == 400
    assert get(server, "/api/bags/0/attention/8/0_0.png?cmap=../../etc")[0] == 400
    assert get(server, "/api/bags/0/attention/8/0_0.png?scale=nope")[0] == 400
    assert get(server, "/api/bags/0/attention/8/0_0.png?scale=raw&vmin=nan")[0] == 400


def test_label_outlines_follow_the_labelled_region_only(server, files):
    # label 1 is x >= 1152; tile 4_3 (x 1024..1280, y 768..1024) holds its left edge at column 128
    plain = png(get(server, "/api/bags/0/attention/11/4_3.png")[2])
    outlined = png(get(server, "/api/bags/0/attention/11/4_3.png?labels=1")[2])
    changed = (plain != outlined).any(axis=2)
    assert (outlined[changed][:, :3] == (0, 214, 255)).all()
    assert changed[:, 128:130].all() and not changed[:, :128].any() and not changed[:, 130:].any()
    # tile 5_3 lies wholly inside the region: its edges are tile edges, not region edges
    inner = png(get(server, "/api/bags/0/attention/11/5_3.png?labels=1")[2])
    assert (inner == png(get(server, "/api/bags/0/attention/11/5_3.png")[2])).all()


def test_thumbnails_are_cut_from_the_slide(server, files):
    status, headers, body = get(server, "/api/bags/0/thumb/0.jpeg")
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    thumb = png(body).astype(int)
    assert thumb.shape == (96, 96, 3) and np.abs(thumb[48, 48] - TISSUE).max() < 12
    assert get(server, "/api/bags/0/thumb/999999.jpeg")[0] == 404


def test_without_a_slide_the_grid_is_the_image(grid_server, files):
    bag = json.loads(get(grid_server, "/api/bags")[2])["bags"][0]
    coords = files["coords"]
    assert bag["slide"] is None
    assert bag["origin"] == coords.min(axis=0).tolist()
    assert [bag["width"], bag["height"]] == (coords.max(axis=0) + STEP - coords.min(axis=0)).tolist()
    assert get(grid_server, "/api/bags/0/slide/0/0_0.jpeg")[0] == 404
    status, headers, body = get(grid_server, "/api/bags/0/grid/0/0_0.png")
    assert status == 200 and png(body).shape[:2] == (1, 1)
    table = files["sm"]
    x, y = int(table.x[3]), int(table.y[3])
    record = json.loads(get(grid_server, f"/api/bags/0/patch?x={x}&y={y}")[2])
    assert record["instance"] == 3  # hover works in level-0 coordinates, whatever the origin
    assert get(grid_server, "/api/bags/0/thumb/0.jpeg")[0] == 404


def test_other_methods_are_refused(server):
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(server)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    connection.request("POST", "/api/bags?" + parts.query, body=b"x")
    assert connection.getresponse().status == 405
    connection.close()


SEGMENTS = ["..", ".", "%2e%2e", "%2E", "static", "viewer.js", "etc", "passwd", "", "api", "bags", "0", "~"]


@pytest.fixture(scope="module")
def viewer(files):
    from smcli.view.server import Viewer

    made = Viewer(bags_of(files["folder"] / "sm" / "slide_a.csv"))
    yield made
    made.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=6), absolute=st.booleans())
def test_only_named_routes_answer(viewer, parts, absolute):
    from smcli.view import pages

    path = ("/" if absolute else "//") + "/".join(parts)
    response = viewer.handle(path, {})
    known = {"/", "/api/bags", "/favicon.ico", *(f"/static/{name}" for name in pages.assets())}
    assert (response.status in (200, 204)) == (path in known), path


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_only_allowed_host_names_pass_the_gate(header):
    from smcli.view.server import Gate, host_name

    gate = Gate("t" * 32, frozenset({"127.0.0.1", "localhost", "::1", "viewer.lab"}), "c")
    refused = gate.refusal(header, {"token": ["t" * 32]}, None)
    assert (refused == "") == (host_name(header) in gate.allowed_hosts)
    assert gate.refusal(header, {"token": ["t" * 31]}, None) != ""  # never without the token


@pytest.fixture(scope="module")
def micrometre_table(files):
    """The sm table with x, y and the patch step in micrometres (0.5 µm per level-0 pixel), its unit
    recorded in the bags file beside it, as `smcli score` writes it for a STAMP bag."""
    folder = files["folder"] / "um"
    folder.mkdir()
    table = files["sm"].copy()
    table["x"] = table["x"] * 0.5
    table["y"] = table["y"] * 0.5
    table.to_csv(folder / "slide_a.csv", index=False)
    (folder / "_bags.csv").write_text(f"bag_id,patch_step,coords_units\nslide_a,{STEP * 0.5:g},micrometres\n")
    return folder / "slide_a.csv"


def test_micrometre_tables_are_placed_with_the_mpp_and_show_their_own_numbers(files, micrometre_table):
    from smcli.scored import Failed

    loaded = list(load_bags(ViewRequest([micrometre_table], slide=files["slide"], mpp=0.5)))
    (bag,) = loaded
    assert isinstance(bag, ViewBag)
    assert (bag.coords == files["coords"]).all() and bag.side == (STEP, STEP)  # level-0 pixels
    assert any("0.5 µm/px (--mpp)" in note for note in bag.notes)
    with serving([bag]) as (_, url):
        table = files["sm"]
        x, y = int(table.x[5]), int(table.y[5])
        record = json.loads(get(url, f"/api/bags/0/patch?x={x + 1}&y={y + 1}")[2])
        assert (record["instance"], record["x"], record["y"]) == (5, x * 0.5, y * 0.5)  # the table's µm
        assert record["box"] == [x, y, STEP, STEP]
        summary = json.loads(get(url, "/api/bags")[2])["bags"][0]
        assert summary["units"] == "micrometres" and "0.5 µm/px" in summary["placed_at"]
    # the test slide records no MPP: without --mpp the bag is refused, naming --mpp
    (failed,) = list(load_bags(ViewRequest([micrometre_table], slide=files["slide"])))
    assert isinstance(failed, Failed) and "--mpp" in failed.error and "\n" not in failed.error
    # on the patch grid micrometres need no scale: drawn as they are
    (grid,) = list(load_bags(ViewRequest([micrometre_table])))
    assert isinstance(grid, ViewBag) and grid.side == (STEP * 0.5, STEP * 0.5) and not grid.notes


def test_log_scale_and_its_refusal_for_values_that_are_not_positive(server, files):
    table = files["folder"] / "sm" / "slide_a.csv"
    (weights,) = list(load_bags(ViewRequest([table], column="attention_weight")))
    assert isinstance(weights, ViewBag)
    t = weights.scaled("log")
    logs = np.log10(files["sm"].attention_weight.to_numpy())
    assert np.allclose(t, (logs - logs.min()) / (logs.max() - logs.min()), atol=1e-6)
    # attention_logit goes negative: a log scale of it is refused, one line
    status, _, body = get(server, "/api/bags/0/attention/7/0_0.png?scale=log")
    assert status == 400 and b"positive" in body and body.count(b"\n") == 1


def test_start_settings_reach_the_page(files):
    from smcli.view.server import PageSettings, ServeOptions, start

    bags = bags_of(files["folder"] / "sm" / "slide_a.csv")
    settings = PageSettings("raw", "Greens", -2.0, 2.0)
    with serving(bags, settings=settings) as (_, url):
        data = json.loads(get(url, "/api/bags")[2])
        assert data["settings"] == {"scale": "raw", "cmap": "Greens", "vmin": -2.0, "vmax": 2.0}
        assert "Greens" in data["colormaps"]  # a --cmap beyond the page's list joins it
        assert get(url, "/api/bags/0/attention/0/0_0.png?cmap=Greens")[0] == 200
    for bad, message in [
        (PageSettings("rank", "inferno", 0.0, 1.0), "add --norm raw"),
        (PageSettings("raw", "inferno", 1.0, None), "go together"),
        (PageSettings("raw", "no-such-map"), "unknown --cmap"),
        (PageSettings("nope"), "unknown --norm"),
    ]:
        with pytest.raises(UsageError, match=message):
            start(bags, ServeOptions(settings=bad))


def test_the_first_view_is_in_the_cache_before_the_url_is_printed(files):
    from smcli.view.tiles import Pyramid

    bags = bags_of(files["folder"] / "sm" / "slide_a.csv", slide=files["slide"])
    with serving(bags) as (running, url):
        pyramid = Pyramid(WIDTH, HEIGHT)  # 2048 px: every level is at most PREWARM_SIDE
        tiles = sum(-(-w // 256) * -(-h // 256) for w, h in map(pyramid.level_size, range(12)))
        cache = running.viewer.cache
        assert len(cache) == 2 * tiles  # slide and attention tile of each
        # what the page asks first is served from there: the cache does not grow
        assert get(url, "/api/bags/0/attention/11/4_3.png?cmap=inferno&scale=rank&labels=0&fade=1")[0] == 200
        assert get(url, "/api/bags/0/slide/11/4_3.jpeg")[0] == 200
        assert len(cache) == 2 * tiles
        get(url, "/api/bags/0/attention/11/4_3.png?cmap=viridis&scale=rank&labels=0&fade=1")
        assert len(cache) == 2 * tiles + 1
