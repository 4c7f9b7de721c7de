// smcli view: the page. Two layers per panel in OpenSeadragon: the slide (or the patch grid's
// "no patch" checkerboard) and the attention tiles the server paints on the same Deep Zoom grid.
// Settings live in the URL's #hash, so a view can be reloaded or shared as it is.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { bag: 0, compare: null, opacity: null, cmap: null, scale: null, vmin: null, vmax: null, labels: false, fade: null };
let config = null; // /api/bags: bags, colormaps, scales, tile_size
const panels = [];

function readHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  const number = (name) => (params.has(name) && params.get(name) !== "" && isFinite(+params.get(name)) ? +params.get(name) : null);
  if (number("bag") !== null) state.bag = number("bag");
  state.compare = number("compare");
  if (number("opacity") !== null) state.opacity = number("opacity");
  if (params.get("cmap")) state.cmap = params.get("cmap");
  if (params.get("scale")) state.scale = params.get("scale");
  state.vmin = number("vmin");
  state.vmax = number("vmax");
  state.labels = params.get("labels") === "1";
  if (params.has("fade")) state.fade = params.get("fade") === "1";
}

function writeHash() {
  const params = new URLSearchParams();
  params.set("bag", state.bag);
  if (state.compare !== null) params.set("compare", state.compare);
  params.set("opacity", state.opacity);
  params.set("cmap", state.cmap);
  params.set("scale", state.scale);
  if (state.scale === "raw") { params.set("vmin", state.vmin); params.set("vmax", state.vmax); }
  if (state.labels) params.set("labels", "1");
  params.set("fade", state.fade ? "1" : "0");
  history.replaceState(null, "", "#" + params.toString());
}

function styleQuery() {
  const params = new URLSearchParams({ cmap: state.cmap, scale: state.scale, labels: state.labels ? "1" : "0", fade: state.fade ? "1" : "0" });
  if (state.scale === "raw") { params.set("vmin", state.vmin); params.set("vmax", state.vmax); }
  return params.toString();
}

function format(value) {
  if (value === null || value === undefined) return "–";
  return typeof value === "number" ? String(value) : value;
}

function maxLevel(bag) { return Math.max(0, Math.ceil(Math.log2(Math.max(bag.width, bag.height)))); }

function source(bag, layer) {
  const base = `api/bags/${bag.index}`;
  return {
    width: bag.width, height: bag.height, tileSize: config.tile_size, tileOverlap: 0,
    minLevel: 0, maxLevel: maxLevel(bag),
    getTileUrl: layer === "attention"
      ? (level, x, y) => `${base}/attention/${level}/${x}_${y}.png?${styleQuery()}`
      : bag.slide
        ? (level, x, y) => `${base}/slide/${level}/${x}_${y}.jpeg`
        : (level, x, y) => `${base}/grid/${level}/${x}_${y}.png`,
  };
}

class Panel {
  constructor(section) {
    this.section = section;
    this.bag = null;
    this.box = document.createElement("div");
    this.box.className = "patch-box";
    this.viewer = OpenSeadragon({
      element: section.querySelector(".osd"),
      prefixUrl: "static/openseadragon/images/",
      drawer: "canvas",
      showNavigator: false, // its own copy of both layers would double the first screen's low-level tiles
      visibilityRatio: 0.5,
      maxZoomPixelRatio: 4,
      animationTime: 0.5,
      gestureSettingsMouse: { clickToZoom: false },
      immediateRender: true, // the first screen fetches the level it shows, not every level below
    });
    this.hovering = null; // [x, y] level 0, waiting to be looked up
    this.inFlight = false;
    new OpenSeadragon.MouseTracker({
      element: this.viewer.canvas,
      moveHandler: (event) => this.pointerAt(event.position),
      leaveHandler: () => showHover(null),
    });
  }

  open(bag) {
    this.bag = bag;
    this.section.querySelector(".caption").textContent =
      `${bag.bag_id} · ${bag.source}` + (bag.probability === null ? "" : ` · probability ${bag.probability.toFixed(3)}`);
    this.viewer.open([
      { tileSource: source(bag, "base") },
      { tileSource: source(bag, "attention"), opacity: state.opacity / 100 },
    ]);
  }

  attentionLayer() { return this.viewer.world.getItemCount() > 1 ? this.viewer.world.getItemAt(1) : null; }

  restyle() {
    if (!this.bag) return;
    this.viewer.addTiledImage({ tileSource: source(this.bag, "attention"), index: 1, replace: true, opacity: state.opacity / 100 });
  }

  setOpacity() { const layer = this.attentionLayer(); if (layer) layer.setOpacity(state.opacity / 100); }

  loaded() {
    const world = this.viewer.world;
    if (world.getItemCount() < 2) return false;
    for (let i = 0; i < world.getItemCount(); i++) if (!world.getItemAt(i).getFullyLoaded()) return false;
    return true;
  }

  // level-0 point under a pixel of the viewer element
  level0At(pixel) {
    const item = this.viewer.world.getItemAt(0);
    if (!item) return null;
    const image = item.viewportToImageCoordinates(this.viewer.viewport.pointFromPixel(pixel));
    return [image.x + this.bag.origin[0], image.y + this.bag.origin[1]];
  }

  // viewport rectangle of a level-0 box
  rectangle(x, y, width, height) {
    const item = this.viewer.world.getItemAt(0);
    return item.imageToViewportRectangle(x - this.bag.origin[0], y - this.bag.origin[1], width, height);
  }

  pointerAt(pixel) {
    const point = this.level0At(pixel);
    if (!point) return;
    hoverAt(point);
  }

  mark(record) {
    if (!record || !this.viewer.world.getItemAt(0)) { this.viewer.removeOverlay(this.box); return; }
    const [x, y, width, height] = record.box;
    const rect = this.rectangle(x, y, width, height);
    if (this.viewer.getOverlayById && this.viewer.getOverlayById(this.box)) this.viewer.updateOverlay(this.box, rect);
    else this.viewer.addOverlay({ element: this.box, location: rect });
  }

  goTo(record) {
    const [x, y, width, height] = record.box;
    const margin = Math.max(width, height) * 1.5;
    this.viewer.viewport.fitBounds(this.rectangle(x - margin, y - margin, width + 2 * margin, height + 2 * margin));
  }
}

// --- hover: one look-up in flight, the latest point wins -------------------------------------
let pendingPoint = null;
let hoverBusy = false;
async function hoverAt(point) {
  pendingPoint = point;
  if (hoverBusy) return;
  hoverBusy = true;
  try {
    while (pendingPoint) {
      const [x, y] = pendingPoint;
      pendingPoint = null;
      const shown = panels.filter((p) => p.bag && !p.section.hidden);
      const records = await Promise.all(shown.map((p) => fetchJson(`api/bags/${p.bag.index}/patch?x=${x}&y=${y}`)));
      shown.forEach((p, i) => p.mark(records[i]));
      showHover(records.some((r) => r) ? records : null, shown);
    }
  } finally {
    hoverBusy = false;
  }
}

const HOVER_ROWS = ["instance", "x", "y", "attention_logit", "attention_weight", "label", "attention_percentile"];
function showHover(records, shown) {
  const head = $("hover").querySelector("thead tr");
  const body = $("hover").querySelector("tbody");
  if (!records) {
    body.innerHTML = "";
    head.innerHTML = "<th></th>";
    panels.forEach((p) => p.mark(null));
    return;
  }
  head.innerHTML = "<th></th>" + shown.map((p) => `<th>${escapeHtml(p.bag.source)}</th>`).join("");
  const column = shown[0].bag.column;
  const rows = HOVER_ROWS.includes(column) ? HOVER_ROWS : [...HOVER_ROWS.slice(0, 5), column, ...HOVER_ROWS.slice(5)];
  body.innerHTML = rows
    .map((name) => `<tr data-name="${name}"><td>${name === "attention_percentile" ? "rank percentile" : name}</td>` +
      records.map((r) => `<td>${r ? escapeHtml(shownValue(name, r[name])) : "–"}</td>`).join("") + "</tr>")
    .join("");
}

// table numbers exactly as the table holds them; the percentile (computed here) to 0.01
function shownValue(name, value) {
  return name === "attention_percentile" && typeof value === "number" ? value.toFixed(2) : format(value);
}

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

async function fetchJson(url) {
  const response = await fetch(url, { credentials: "same-origin" });
  if (!response.ok) throw new Error(`${url}: ${response.status}`);
  return response.json();
}

// --- side panel -------------------------------------------------------------------------------
function drawColorbar() {
  const colours = config.colormaps[state.cmap];
  const canvas = $("colorbar");
  const context = canvas.getContext("2d");
  colours.forEach((colour, i) => { context.fillStyle = colour; context.fillRect(i * canvas.width / colours.length, 0, canvas.width / colours.length + 1, canvas.height); });
  const bag = config.bags[state.bag];
  let ticks;
  if (state.scale === "rank") ticks = ["0 %", "50 %", "100 %"];
  else if (state.scale === "log") ticks = [bag.min, Math.sqrt(bag.min * bag.max), bag.max].map((v) => Number(v).toPrecision(3));
  else {
    const lo = state.scale === "raw" ? state.vmin : bag.min;
    const hi = state.scale === "raw" ? state.vmax : bag.max;
    ticks = [lo, (lo + hi) / 2, hi].map((v) => Number(v).toPrecision(3));
  }
  [$("tick-lo").textContent, $("tick-mid").textContent, $("tick-hi").textContent] = ticks;
}

async function showTop() {
  const bag = config.bags[state.bag];
  const list = $("top");
  list.innerHTML = "";
  const records = await fetchJson(`api/bags/${bag.index}/top?k=20`);
  const colours = config.colormaps[state.cmap];
  for (const record of records) {
    const item = document.createElement("li");
    item.dataset.instance = record.instance;
    const picture = bag.slide ? document.createElement("img") : document.createElement("div");
    if (bag.slide) {
      picture.loading = "lazy";
      picture.alt = `instance ${record.instance}`;
      picture.dataset.src = `api/bags/${bag.index}/thumb/${record.row}.jpeg`;
    }
    else { picture.className = "swatch"; picture.style.background = colours[Math.round((record.attention_percentile / 100) * (colours.length - 1))]; }
    const text = document.createElement("span");
    text.textContent = `#${record.rank} instance ${record.instance} (x ${record.x}, y ${record.y}) · logit ${format(record.attention_logit)} · weight ${format(record.attention_weight)}`;
    item.append(picture, text);
    item.addEventListener("click", () => { panels[0].goTo(record); panels[0].mark(record); });
    list.append(item);
  }
  // thumbnails wait for the slide's first screen: they are cut from level 0 and would queue before its tiles
  whenLoaded(() => list.querySelectorAll("img[data-src]").forEach((img) => { img.src = img.dataset.src; }));
}

function whenLoaded(then) {
  const check = () => (window.smcliView.loaded() ? then() : setTimeout(check, 100));
  check();
}

function showBagInfo() {
  const bag = config.bags[state.bag];
  const probability = bag.probability === null ? "" : `<span class="probability">probability ${bag.probability.toFixed(3)}</span> · `;
  const unit = bag.slide ? "px" : bag.units === "micrometres" ? "µm" : "px";
  const side = bag.side[0] === bag.side[1] ? `${bag.side[0]}` : `${bag.side[0]} × ${bag.side[1]}`;
  $("bag-info").innerHTML = `${probability}${bag.patches} patches of ${side} ${unit} · ${escapeHtml(bag.column)}<br>` +
    `table ${escapeHtml(bag.source)}` + (bag.slide ? ` · slide ${escapeHtml(bag.slide)}` : " · patch grid (no slide)") +
    (bag.placed_at ? `<br>${escapeHtml(bag.placed_at)}` : "");
  $("labels").disabled = !bag.has_labels; // a table without a label column has nothing to outline
  const compare = $("compare");
  compare.innerHTML = '<option value="">(none)</option>';
  for (const other of config.bags) {
    if (other.index !== bag.index && other.bag_id === bag.bag_id) compare.add(new Option(`${other.bag_id} · ${other.source}`, other.index));
  }
  compare.value = state.compare === null ? "" : String(state.compare);
}

function openBags() {
  const bag = config.bags[state.bag];
  showBagInfo();
  panels[0].open(bag);
  const partner = state.compare === null ? null : config.bags[state.compare];
  $("view-b").hidden = !partner;
  if (partner) panels[1].open(partner);
  drawColorbar();
  writeHash();
  showTop();
}

function restyle() { drawColorbar(); writeHash(); panels.forEach((p) => p.restyle()); }

// linked pan and zoom: the two bags are the same slide, so viewport coordinates agree
function link(a, b) {
  let busy = false;
  const follow = (from, to) => () => {
    if (busy || $("view-b").hidden) return;
    busy = true;
    to.viewer.viewport.zoomTo(from.viewer.viewport.getZoom(), null, true);
    to.viewer.viewport.panTo(from.viewer.viewport.getCenter(), true);
    busy = false;
  };
  a.viewer.addHandler("viewport-change", follow(a, b));
  b.viewer.addHandler("viewport-change", follow(b, a));
}

async function main() {
  readHash();
  config = await fetchJson("api/bags");
  if (!(state.bag in config.bags)) state.bag = 0;
  if (state.compare !== null && (!(state.compare in config.bags) || state.compare === state.bag)) state.compare = null;
  const start = config.settings; // smcli view --norm/--cmap/--vmin/--vmax; the #hash overrides
  if (!config.colormaps[state.cmap]) state.cmap = config.colormaps[start.cmap] ? start.cmap : "inferno";
  if (!config.scales.includes(state.scale)) state.scale = start.scale;
  if (state.vmin === null && state.vmax === null && start.vmin !== null) { state.vmin = start.vmin; state.vmax = start.vmax; }
  const bag = config.bags[state.bag];
  // over a slide, with fade: 0.15 at the bottom of the scale to 0.9 at the top, as heatmap; the grid opaque
  if (state.opacity === null) state.opacity = bag.slide ? 90 : 100;
  if (state.fade === null) state.fade = Boolean(bag.slide); // on the grid, low values must not look like "no patch"
  if (state.vmin === null) state.vmin = bag.min;
  if (state.vmax === null) state.vmax = bag.max;

  for (const bagEntry of config.bags) {
    const label = `${bagEntry.bag_id} · ${bagEntry.source}` + (bagEntry.probability === null ? "" : ` · P ${bagEntry.probability.toFixed(3)}`);
    $("bag").add(new Option(label, bagEntry.index));
  }
  for (const name of Object.keys(config.colormaps)) $("cmap").add(new Option(name, name));
  $("bag").value = state.bag;
  $("cmap").value = state.cmap;
  $("scale").value = state.scale;
  $("opacity").value = state.opacity;
  $("opacity-value").textContent = `${state.opacity} %`;
  $("vmin").value = state.vmin;
  $("vmax").value = state.vmax;
  $("raw-range").hidden = state.scale !== "raw";
  $("labels").checked = state.labels;
  $("fade").checked = state.fade;

  panels.push(new Panel($("view-a")), new Panel($("view-b")));
  link(panels[0], panels[1]);

  $("bag").addEventListener("change", () => {
    state.bag = +$("bag").value;
    state.compare = null;
    const chosen = config.bags[state.bag];
    state.vmin = chosen.min; state.vmax = chosen.max;
    $("vmin").value = state.vmin; $("vmax").value = state.vmax;
    openBags();
  });
  $("compare").addEventListener("change", () => {
    state.compare = $("compare").value === "" ? null : +$("compare").value;
    openBags();
  });
  $("opacity").addEventListener("input", () => {
    state.opacity = +$("opacity").value;
    $("opacity-value").textContent = `${state.opacity} %`;
    panels.forEach((p) => p.setOpacity());
    writeHash();
  });
  $("cmap").addEventListener("change", () => { state.cmap = $("cmap").value; restyle(); showTop(); });
  $("scale").addEventListener("change", () => { state.scale = $("scale").value; $("raw-range").hidden = state.scale !== "raw"; restyle(); });
  for (const id of ["vmin", "vmax"]) {
    $(id).addEventListener("change", () => {
      const lo = +$("vmin").value, hi = +$("vmax").value;
      if (!(hi > lo)) return;
      state.vmin = lo; state.vmax = hi; restyle();
    });
  }
  $("labels").addEventListener("change", () => { state.labels = $("labels").checked; restyle(); });
  $("fade").addEventListener("change", () => { state.fade = $("fade").checked; restyle(); });
  openBags();
}

// for tests and the curious: the panels, the state, and whether every layer is fully drawn
window.smcliView = { panels, state, loaded: () => panels.length > 0 && panels.every((p) => p.section.hidden || p.loaded()) };
main();
