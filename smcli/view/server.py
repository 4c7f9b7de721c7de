"""The viewer's HTTP server: the standard library's ThreadingHTTPServer, one thread per connection.

Every request passes two gates before any route is looked at:

1. Host allow-list (DNS rebinding): the Host header's name must be 127.0.0.1, localhost, ::1,
   the --host address, or an --allow-host name; else 403.
2. Token: the URL printed at start carries `?token=<random>`; that request sets a cookie (HttpOnly,
   SameSite=Strict, named for the port) which the page's own requests carry. Neither: 403.

Routes are fixed regular expressions over the raw (still percent-encoded) path; their parts are
numbers, or a key into the table of shipped assets (smcli.view.pages). Only the bags and slides
named on the command line are ever read. Tiles go through one size-limited cache.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import re
import secrets
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from smcli.errors import UsageError
from smcli.view import attention, pages, patches
from smcli.view.data import SCALES, ViewBag
from smcli.view.tiles import CACHE_BYTES, NoSuchTile, Pyramid, SlideTiles, TileCache, checker_png

COLORMAPS = ("inferno", "viridis", "magma", "plasma", "turbo", "cividis", "coolwarm", "RdYlBu_r")
LOCAL_NAMES = ("127.0.0.1", "localhost", "::1")
THUMB_SIDE = 96
PREWARM_SIDE = 2048
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
        "connect-src 'self'; frame-ancestors 'none'"
    ),
    "Cache-Control": "no-store",
}

_TILE = r"(\d{1,2})/(\d{1,7})_(\d{1,7})"
ROUTES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"/"), "page"),
    (re.compile(r"/favicon\.ico"), "favicon"),
    (re.compile(r"/static/([A-Za-z0-9_\-][A-Za-z0-9_.\-/]*)"), "static"),
    (re.compile(r"/api/bags"), "bags"),
    (re.compile(rf"/api/bags/(\d{{1,6}})/slide/{_TILE}\.jpeg"), "slide_tile"),
    (re.compile(rf"/api/bags/(\d{{1,6}})/grid/{_TILE}\.png"), "grid_tile"),
    (re.compile(rf"/api/bags/(\d{{1,6}})/attention/{_TILE}\.png"), "attention_tile"),
    (re.compile(r"/api/bags/(\d{1,6})/patch"), "patch"),
    (re.compile(r"/api/bags/(\d{1,6})/top"), "top"),
    (re.compile(r"/api/bags/(\d{1,6})/thumb/(\d{1,9})\.jpeg"), "thumb"),
]


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


class BadRequest(ValueError):
    """A query the server cannot use (400)."""


def _json(data) -> Response:
    return Response(200, json.dumps(data, allow_nan=False).encode(), "application/json")


def _text(status: int, message: str) -> Response:
    return Response(status, (message + "\n").encode())


class Viewer:
    """The state behind the routes: the bags, one SlideTiles per slide file, the tile cache."""

    def __init__(
        self, bags: list[ViewBag], cache_bytes: int = CACHE_BYTES, settings: PageSettings | None = None
    ) -> None:
        self.bags = bags
        self.settings = settings or PageSettings()
        self.colormaps = tuple(dict.fromkeys((*COLORMAPS, self.settings.cmap)))
        self.cache = TileCache(cache_bytes)
        self._slides: dict[Path, SlideTiles] = {}
        self._luts: dict[str, object] = {}
        self._lock = threading.Lock()
        self.pyramids = [
            self.slide(bag.slide).pyramid if bag.slide is not None else Pyramid(*bag.size) for bag in bags
        ]
        self.bag_list = self.make_bag_list()

    def prewarm(self) -> None:
        """Render the first view's tiles into the cache before the URL is printed: bag 0, the whole
        image, every level up to PREWARM_SIDE px on its longer side (what any screen shows first),
        slide and attention layer, in the page's starting style. Costs start-up time (~0.5 s for
        100k patches), saves it on the first screen, where the browser would queue ~80 tiles."""
        if not self.bags:
            return
        bag, pyramid = self.bags[0], self.pyramids[0]
        query = self.start_query(bag)
        base = "slide" if bag.slide is not None else "grid"
        suffix = "jpeg" if bag.slide is not None else "png"
        for level in range(pyramid.max_level + 1):
            width, height = pyramid.level_size(level)
            if max(width, height) > PREWARM_SIDE:
                break
            for col in range(-(-width // pyramid.tile)):
                for row in range(-(-height // pyramid.tile)):
                    self.handle(f"/api/bags/0/{base}/{level}/{col}_{row}.{suffix}", {})
                    self.handle(f"/api/bags/0/attention/{level}/{col}_{row}.png", query)

    def start_query(self, bag: ViewBag) -> dict[str, list[str]]:
        """The attention tiles' query as the page first sends it (viewer.js styleQuery)."""
        settings = self.settings
        query = {
            "cmap": [settings.cmap],
            "scale": [settings.scale],
            "labels": ["0"],
            "fade": ["1" if bag.slide is not None else "0"],
        }
        if settings.scale == "raw":
            low = settings.vmin if settings.vmin is not None else float(bag.values.min())
            high = settings.vmax if settings.vmax is not None else float(bag.values.max())
            query["vmin"], query["vmax"] = [repr(low)], [repr(high)]
        return query

    def slide(self, path: Path) -> SlideTiles:
        with self._lock:
            found = self._slides.get(path)
            if found is None:
                found = self._slides[path] = SlideTiles(path)
            return found

    def lut(self, name: str):
        """(256, 3) uint8 colours of one of the page's colour maps (matplotlib's), made once."""
        if name not in self.colormaps:
            raise BadRequest(f"unknown colour map {name!r}")
        with self._lock:
            if name not in self._luts:
                from smcli.heatmap import colour_map, lookup_table

                self._luts[name] = lookup_table(colour_map(name))
            return self._luts[name]

    def close(self) -> None:
        with self._lock:
            for tiles in self._slides.values():
                tiles.close()
            self._slides.clear()

    # --- routes ------------------------------------------------------------------------------

    def handle(self, path: str, query: dict[str, list[str]]) -> Response:
        """The response to an authorized GET of `path` (raw, percent-encoded) with `query`."""
        for pattern, name in ROUTES:
            found = pattern.fullmatch(path)
            if found:
                try:
                    return getattr(self, f"route_{name}")(*found.groups(), query=query)
                except NoSuchTile:
                    return _text(404, "not found")
                except (BadRequest, UsageError) as err:
                    return _text(400, f"bad request: {err}")
        return _text(404, "not found")

    def route_page(self, query) -> Response:
        asset = pages.page()
        return Response(200, asset.body, asset.content_type)

    def route_favicon(self, query) -> Response:
        return Response(204, b"")

    def route_static(self, name: str, query) -> Response:
        asset = pages.asset(name)
        if asset is None:
            return _text(404, "not found")
        return Response(200, asset.body, asset.content_type)

    def route_bags(self, query) -> Response:
        return Response(200, self.bag_list, "application/json")

    def make_bag_list(self) -> bytes:
        """The page's first request, made before the URL is printed (matplotlib's import and the
        colour maps take a few hundred ms, which the first screen should not wait for)."""
        colormaps = {
            name: ["#%02x%02x%02x" % tuple(int(c) for c in rgb) for rgb in self.lut(name)]  # noqa: UP031
            for name in self.colormaps
        }
        labels = source_labels(self.bags)
        data = {
            "bags": [
                {**patches.bag_summary(bag), "source": label}
                for bag, label in zip(self.bags, labels, strict=True)
            ],
            "colormaps": colormaps,
            "scales": list(SCALES),
            "tile_size": Pyramid(1, 1).tile,
            "settings": dataclasses.asdict(self.settings),
        }
        return json.dumps(data, allow_nan=False).encode()

    def _bag(self, index: str) -> ViewBag:
        number = int(index)
        if number >= len(self.bags):
            raise NoSuchTile(f"bag {number}")
        return self.bags[number]

    def route_slide_tile(self, index: str, level: str, col: str, row: str, query) -> Response:
        bag = self._bag(index)
        if bag.slide is None:
            raise NoSuchTile("no slide")
        tiles = self.slide(bag.slide)
        key = ("slide", bag.slide, int(level), int(col), int(row))
        body = self.cache.get_or_make(key, lambda: tiles.jpeg(int(level), int(col), int(row)))
        return Response(200, body, "image/jpeg")

    def route_grid_tile(self, index: str, level: str, col: str, row: str, query) -> Response:
        bag = self._bag(index)
        x0, y0, x1, y1 = self.pyramids[bag.index].tile_box(int(level), int(col), int(row))
        body = self.cache.get_or_make(("grid", x1 - x0, y1 - y0), lambda: checker_png(x1 - x0, y1 - y0))
        return Response(200, body, "image/png")

    def route_attention_tile(self, index: str, level: str, col: str, row: str, query) -> Response:
        bag = self._bag(index)
        style = self.style(query, bag)
        pyramid = self.pyramids[bag.index]
        tile = (int(level), int(col), int(row))
        pyramid.tile_box(*tile)  # NoSuchTile before anything is drawn
        key = ("attention", bag.index, *tile, *style.key)
        body = self.cache.get_or_make(key, lambda: attention.render(bag, pyramid, *tile, style))
        return Response(200, body, "image/png")

    def style(self, query: dict[str, list[str]], bag: ViewBag) -> attention.Style:
        cmap = _one(query, "cmap", "inferno")
        scale = _one(query, "scale", "rank")
        if scale not in SCALES:
            raise BadRequest(f"unknown scale {scale!r}")
        vmin = vmax = None
        if scale == "raw":
            vmin = _number(query, "vmin", float(bag.values.min()))
            vmax = _number(query, "vmax", float(bag.values.max()))
            if not vmax > vmin:
                raise BadRequest("vmax must be above vmin")
        labels = _one(query, "labels", "0") == "1"
        fade = _one(query, "fade", "0") == "1"
        return attention.Style(cmap, self.lut(cmap), scale, vmin, vmax, labels, fade)

    def route_patch(self, index: str, query) -> Response:
        bag = self._bag(index)
        x = _number(query, "x", None)
        y = _number(query, "y", None)
        if x is None or y is None:
            raise BadRequest("x and y are required")
        return _json(patches.patch_at(bag, x, y))

    def route_top(self, index: str, query) -> Response:
        bag = self._bag(index)
        k = int(_number(query, "k", 20) or 0)
        return _json(patches.top_patches(bag, k))

    def route_thumb(self, index: str, row: str, query) -> Response:
        bag = self._bag(index)
        number = int(row)
        if bag.slide is None or number >= bag.values.shape[0]:
            raise NoSuchTile("no thumbnail")
        tiles = self.slide(bag.slide)
        x, y = (int(v) for v in bag.coords[number])
        size = max(1, round(max(bag.side)))
        key = ("thumb", bag.slide, x, y, size)
        body = self.cache.get_or_make(key, lambda: tiles.region(x, y, size, THUMB_SIDE))
        return Response(200, body, "image/jpeg")


def source_labels(bags: list[ViewBag]) -> list[str]:
    """Each bag's table as the page names it: the file name, with its folder when two share a name
    (sm/slide_01.csv and abmil/slide_01.csv side by side)."""
    names = [bag.bag.source.name for bag in bags]
    return [
        f"{bag.bag.source.parent.name}/{name}" if names.count(name) > 1 else name
        for bag, name in zip(bags, names, strict=True)
    ]


def _one(query: dict[str, list[str]], name: str, default: str) -> str:
    values = query.get(name)
    return values[-1] if values else default


def _number(query: dict[str, list[str]], name: str, default):
    text = _one(query, name, "")
    if text == "":
        return default
    try:
        value = float(text)
    except ValueError:
        raise BadRequest(f"{name} must be a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise BadRequest(f"{name} must be finite")
    return value


# --- the gates --------------------------------------------------------------------------------


def host_name(header: str | None) -> str | None:
    """The name in a Host header without its port ('[::1]:8000' -> '::1'); None when malformed."""
    if not header:
        return None
    header = header.strip().lower()
    if header.startswith("["):
        end = header.find("]")
        return header[1:end] if end > 0 else None
    name, _, port = header.partition(":")
    if port and not port.isdigit():
        return None
    return name or None


@dataclass(frozen=True)
class Gate:
    """Who may ask: the token, and the Host names allowed."""

    token: str
    allowed_hosts: frozenset[str]
    cookie: str

    def refusal(self, host_header: str | None, query: dict[str, list[str]], cookies: str | None) -> str:
        """Why a request is refused ('' when it is not)."""
        name = host_name(host_header)
        if name is None or name not in self.allowed_hosts:
            return "Host not allowed"
        given = _one(query, "token", "") or _cookie(cookies, self.cookie)
        if not given or not hmac.compare_digest(given.encode(), self.token.encode()):
            return "a valid token is required: open the URL smcli view printed"
        return ""


def _cookie(header: str | None, name: str) -> str:
    for part in (header or "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return ""


class Handler(BaseHTTPRequestHandler):
    server: ViewServer
    protocol_version = "HTTP/1.1"
    # headers and body go out as two writes: with Nagle's algorithm on, the second waits for the
    # client's delayed ACK (~40 ms on Linux) on every keep-alive response
    disable_nagle_algorithm = True

    def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
        parts = urlsplit(self.path)
        query = parse_qs(parts.query, keep_blank_values=True)
        gate = self.server.gate
        refused = gate.refusal(self.headers.get("Host"), query, self.headers.get("Cookie"))
        if refused:
            self.send(_text(403, f"forbidden: {refused}"))
            return
        try:
            response = self.server.viewer.handle(parts.path, query)
        except Exception as err:  # a slide read failing mid-run: answer, keep serving
            response = _text(500, f"error: {type(err).__name__}: {str(err)[:200]}")
        if "token" in query and parts.path == "/":
            response.headers["Set-Cookie"] = f"{gate.cookie}={gate.token}; Path=/; HttpOnly; SameSite=Strict"
        self.send(response)

    def do_HEAD(self) -> None:  # noqa: N802
        self.send(_text(405, "method not allowed"), body=False)

    do_POST = do_PUT = do_DELETE = do_HEAD  # noqa: N815

    def send(self, response: Response, body: bool = True) -> None:
        try:
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(response.body)))
            for key, value in {**SECURITY_HEADERS, **response.headers}.items():
                self.send_header(key, value)
            self.end_headers()
            if body:
                self.wfile.write(response.body)
        except (BrokenPipeError, ConnectionResetError):  # the browser moved on: nothing to do
            self.close_connection = True

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the standard library's name)
        pass  # stdout is the URL only; stderr stays for warnings and errors


class ViewServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], viewer: Viewer, gate: Gate) -> None:
        self.viewer = viewer
        self.gate = gate
        super().__init__(address, Handler)

    def handle_error(self, request, client_address) -> None:  # a dropped connection: no traceback
        pass


@dataclass(frozen=True)
class PageSettings:
    """How the page starts (--norm, --cmap, --vmin/--vmax); the page's own controls change them."""

    scale: str = "rank"
    cmap: str = "inferno"
    vmin: float | None = None
    vmax: float | None = None


def check_settings(settings: PageSettings) -> None:
    """UsageError for a scale or colour map the page cannot start with (as heatmap checks them)."""
    from smcli.heatmap import check_scale, colour_map

    check_scale(settings.scale, settings.vmin, settings.vmax)
    colour_map(settings.cmap)


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 0
    allow_hosts: tuple[str, ...] = ()
    cache_bytes: int = CACHE_BYTES
    settings: PageSettings = PageSettings()


def start(bags: list[ViewBag], options: ServeOptions) -> tuple[ViewServer, str]:
    """Bind the server (not serving yet) and make its token; returns it and the URL to open."""
    if not 0 <= options.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {options.port}")
    check_settings(options.settings)
    viewer = Viewer(bags, options.cache_bytes, options.settings)
    token = secrets.token_urlsafe(24)
    allowed = frozenset(name.lower() for name in (*LOCAL_NAMES, options.host, *options.allow_hosts))
    try:
        server_class = _server_class(options.host)
        server = server_class((options.host, options.port), viewer, Gate(token, allowed, "smcli_view"))
        server.gate = Gate(token, allowed, f"smcli_view_{server.server_address[1]}")  # a cookie per port
    except OSError as err:
        viewer.close()
        raise UsageError(f"cannot listen on {options.host}:{options.port} ({err.strerror or err})") from None
    port = server.server_address[1]
    viewer.prewarm()
    shown = f"[{options.host}]" if ":" in options.host else options.host
    return server, f"http://{shown}:{port}/?token={token}"


def _server_class(host: str) -> type[ViewServer]:
    if ":" in host:
        import socket

        class ViewServer6(ViewServer):
            address_family = socket.AF_INET6

        return ViewServer6
    return ViewServer


def serve_until_stopped(server: ViewServer, on_serving: Callable[[], None] | None = None) -> str:
    """Serve in a thread until SIGINT or SIGTERM; then stop cleanly. Returns the signal's name."""
    stopped = threading.Event()
    received: list[str] = []

    def stop(signum, frame) -> None:
        received.append(signal.Signals(signum).name)
        stopped.set()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    worker = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    worker.start()
    try:
        if on_serving is not None:
            on_serving()
        while not stopped.wait(0.5):
            pass
    finally:
        server.shutdown()
        server.server_close()
        server.viewer.close()
        for sig, old in previous.items():
            signal.signal(sig, old)
    return received[0] if received else ""
