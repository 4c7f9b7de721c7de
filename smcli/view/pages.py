"""The page and its assets: the files shipped under `static/`, served by name from a fixed table.

The table is built once from the package's own folder; a URL only ever selects one of its keys,
so nothing in a URL becomes a file-system path (`/static/../x`, `%2e%2e`, absolute paths: 404).
OpenSeadragon (BSD-3-Clause, `static/openseadragon/LICENSE.txt`) is taken unchanged from its npm
package's `build/openseadragon/`; `index.html`, `viewer.js` and `viewer.css` are smcli's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

STATIC = Path(__file__).parent / "static"
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".txt": "text/plain; charset=utf-8",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str


@lru_cache(maxsize=1)
def assets() -> dict[str, Asset]:
    """Every shipped file by its path under static/ ('openseadragon/openseadragon.min.js'), read once."""
    table = {}
    for path in sorted(STATIC.rglob("*")):
        content_type = TYPES.get(path.suffix)
        if path.is_file() and content_type is not None:
            table[path.relative_to(STATIC).as_posix()] = Asset(path.read_bytes(), content_type)
    return table


def page() -> Asset:
    """The viewer's one HTML page."""
    return assets()["index.html"]


def asset(name: str) -> Asset | None:
    """A shipped file by name, or None: the name is a key, never a path."""
    return assets().get(name)
