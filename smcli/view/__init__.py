"""`smcli view`: a local web viewer of per-patch attention, over the slide at every zoom or on the grid.

Layout (imports run downward, as listed):

* `data`      the bags to show: score tables / scored bags (smcli.scored) plus their slides.
* `tiles`     Deep Zoom geometry, slide tiles (OpenSlide's DeepZoomGenerator), the bounded tile cache.
* `attention` attention tiles: each patch's true footprint painted server-side on the Deep Zoom grid.
* `patches`   patch data: the bag list, hover look-up, top-K list, patch thumbnails (JSON / JPEG).
* `pages`     the page and the shipped assets under `static/` (OpenSeadragon, BSD, with its licence).
* `server`    the HTTP server: token, Host allow-list, routes (no URL part ever names a file).
"""
