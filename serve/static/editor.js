// The DFNet inpainting page: a mask editor (brush, eraser, undo/redo, zoom and pan), the
// inpainting request, a history of results to keep editing, before/after comparison, and the
// fusion blocks' α and C (the paper's Figure 3) over the same view. No build step, no
// download: this module and editor.css are served by the app itself.
"use strict";

const $ = (id) => document.getElementById(id);
const stage = $("stage"), view = $("view"), overlay = $("overlay");
const viewCtx = view.getContext("2d"), overlayCtx = overlay.getContext("2d");
const brush = $("brush"), errorEl = $("error"), statusEl = $("status");

// The mask lives at the photo's own size: white (opaque) where to fill, transparent elsewhere.
// The visible canvases are only views of the stage's size.
const mask = document.createElement("canvas");
const maskCtx = mask.getContext("2d", { willReadFrequently: false });

const state = {
  entries: [],  // history: {label, name, blob, url, img, source: {image, name, mask} | null, explain: Map}
  current: -1,
  ops: [],  // mask operations on the current image: strokes, loaded masks, clears
  undone: [],  // redo stack
  stroke: null,  // the stroke being drawn
  pan: null,  // {x, y, ox, oy} while dragging the view
  tool: "brush",
  view: "result",  // result | alpha | alpha_rgb | raw
  level: 0,
  comparing: false,  // the compare button or key is held
  compareShare: 0,  // the compare slider: share of the view (from the left) showing the original
  scale: 1, fit: 1, ox: 0, oy: 0,  // view transform: stage px = natural px * scale + (ox, oy)
  space: false,
  busy: false,
};
// Counters the browser test reads: strokes must not redraw the photo (it can be 12 MP).
const stats = { imageRenders: 0, overlayRenders: 0, segments: 0 };

const entry = () => state.entries[state.current];
const photo = () => entry()?.img;
function showError(msg) { errorEl.textContent = msg || ""; }

// ------------------------------------------------------------------ view transform and rendering
function stageSize() { return { w: stage.clientWidth, h: stage.clientHeight }; }

function resizeCanvases() {
  const { w, h } = stageSize(), dpr = window.devicePixelRatio || 1;
  for (const c of [view, overlay]) {
    c.width = Math.max(1, Math.round(w * dpr));
    c.height = Math.max(1, Math.round(h * dpr));
  }
}

function resetView() {
  const img = photo();
  if (!img) return;
  const { w, h } = stageSize();
  state.fit = Math.min(1, w / img.naturalWidth, h / img.naturalHeight);  // never upscale
  state.scale = state.fit;
  state.ox = Math.round((w - img.naturalWidth * state.scale) / 2);  // whole pixels: a sharp 1:1 view
  state.oy = Math.round((h - img.naturalHeight * state.scale) / 2);
  requestRender(true, true);
}

// Zoom by `factor` keeping the photo's point under stage position (cx, cy) where it is.
function zoomAt(factor, cx, cy) {
  if (!photo()) return;
  const scale = Math.min(32, Math.max(state.fit / 4, state.scale * factor));
  const nx = (cx - state.ox) / state.scale, ny = (cy - state.oy) / state.scale;
  state.scale = scale;
  state.ox = cx - nx * scale;
  state.oy = cy - ny * scale;
  requestRender(true, true);
}

function setTransform(ctx) {
  const dpr = window.devicePixelRatio || 1;
  ctx.setTransform(dpr * state.scale, 0, 0, dpr * state.scale, dpr * state.ox, dpr * state.oy);
}

// The picture shown: the current image, or one of the fusion maps of the result.
function displayed() {
  if (state.view === "result") return photo();
  return entry().explain.get(state.level)?.[state.view] || photo();
}

function renderImage() {
  stats.imageRenders++;
  const dpr = window.devicePixelRatio || 1;
  viewCtx.setTransform(1, 0, 0, 1, 0, 0);
  viewCtx.clearRect(0, 0, view.width, view.height);
  const img = photo();
  if (!img) return;
  viewCtx.imageSmoothingEnabled = state.scale < 2;  // zoomed in: show the pixels
  setTransform(viewCtx);
  viewCtx.drawImage(displayed(), 0, 0);
  const share = state.comparing ? 1 : state.compareShare;
  if (share > 0 && state.current > 0) {  // the original over the left part of the view
    viewCtx.save();
    viewCtx.setTransform(1, 0, 0, 1, 0, 0);
    viewCtx.beginPath();
    viewCtx.rect(0, 0, view.width * share, view.height);
    viewCtx.clip();
    setTransform(viewCtx);
    viewCtx.drawImage(state.entries[0].img, 0, 0);
    viewCtx.restore();
    if (share < 1) {  // the dividing line
      viewCtx.setTransform(1, 0, 0, 1, 0, 0);
      viewCtx.fillStyle = "#fff";
      viewCtx.fillRect(Math.round(view.width * share) - dpr, 0, 2 * dpr, view.height);
    }
  }
  stage.dataset.view = state.comparing ? "original" : state.view;
  $("zoom-value").value = Math.round(state.scale * 100) + " %";
}

// The red overlay: the natural-size mask scaled into view, coloured. Hidden while comparing
// and in the fusion views, where it would cover what they show.
function renderOverlay() {
  stats.overlayRenders++;
  overlayCtx.setTransform(1, 0, 0, 1, 0, 0);
  overlayCtx.clearRect(0, 0, overlay.width, overlay.height);
  if (!photo()) return;
  overlayCtx.imageSmoothingEnabled = false;
  setTransform(overlayCtx);
  overlayCtx.drawImage(mask, 0, 0);
  overlayCtx.setTransform(1, 0, 0, 1, 0, 0);
  overlayCtx.globalCompositeOperation = "source-in";
  overlayCtx.fillStyle = "#f00";
  overlayCtx.fillRect(0, 0, overlay.width, overlay.height);
  overlayCtx.globalCompositeOperation = "source-over";
}

let pending = null;  // one render per animation frame, whatever asked for it
function requestRender(image, overlayToo) {
  if (!pending) {
    pending = { image: false, overlay: false };
    requestAnimationFrame(() => {
      const { image: i, overlay: o } = pending;
      pending = null;
      if (i) renderImage();
      if (o) renderOverlay();
    });
  }
  pending.image ||= image;
  pending.overlay ||= overlayToo;
}

function updateOverlayVisibility() {
  overlay.style.visibility = state.comparing || state.view !== "result" ? "hidden" : "visible";
}

// ------------------------------------------------------------------ mask operations
// Draw a stroke's points from index `from` (a dot first when it starts there) on `ctx`, in the
// coordinates `ctx` is set to. Brush: paint; eraser: remove paint.
function drawStroke(ctx, s, from, color) {
  const p = s.points;
  ctx.globalCompositeOperation = s.tool === "eraser" ? "destination-out" : "source-over";
  ctx.strokeStyle = ctx.fillStyle = color;
  ctx.lineWidth = s.size;
  ctx.lineCap = ctx.lineJoin = "round";
  if (from === 0) {
    ctx.beginPath();
    ctx.arc(p[0].x, p[0].y, s.size / 2, 0, 2 * Math.PI);
    ctx.fill();
  }
  if (p.length > 1) {
    ctx.beginPath();
    ctx.moveTo(p[Math.max(0, from - 1)].x, p[Math.max(0, from - 1)].y);
    for (let i = Math.max(1, from); i < p.length; i++) ctx.lineTo(p[i].x, p[i].y);
    ctx.stroke();
  }
  ctx.globalCompositeOperation = "source-over";
}

function applyOp(op) {
  maskCtx.setTransform(1, 0, 0, 1, 0, 0);
  if (op.type === "stroke") drawStroke(maskCtx, op, 0, "#fff");
  else if (op.type === "mask") maskCtx.drawImage(op.canvas, 0, 0);
  else if (op.type === "clear") maskCtx.clearRect(0, 0, mask.width, mask.height);
}

function replay() {
  maskCtx.clearRect(0, 0, mask.width, mask.height);
  for (const op of state.ops) applyOp(op);
  requestRender(false, true);
  updateButtons();
}

function pushOp(op) {
  state.ops.push(op);
  state.undone = [];
  updateButtons();
}

function undo() {
  if (state.stroke || !state.ops.length) return;
  state.undone.push(state.ops.pop());
  replay();
}

function redo() {
  if (state.stroke || !state.undone.length) return;
  const op = state.undone.pop();
  state.ops.push(op);
  applyOp(op);
  requestRender(false, true);
  updateButtons();
}

function clearMask() {
  if (!photo() || !state.ops.length) return;
  pushOp({ type: "clear" });
  applyOp({ type: "clear" });
  requestRender(false, true);
}

// Any painted pixel counts: antialiased edges are filled too, and the server gets a binary mask
// (white = fill, on black) at the photo's own size.
function maskBlob() {
  const data = maskCtx.getImageData(0, 0, mask.width, mask.height);
  const px = new Uint32Array(data.data.buffer);
  for (let i = 0; i < px.length; i++) px[i] = px[i] >>> 24 ? 0xffffffff : 0xff000000;
  const out = document.createElement("canvas");
  out.width = mask.width; out.height = mask.height;
  out.getContext("2d").putImageData(data, 0, 0);
  return new Promise((resolve) => out.toBlob(resolve, "image/png"));
}

// ------------------------------------------------------------------ pointer, wheel, keys
function stagePoint(e) {
  const r = overlay.getBoundingClientRect();
  return { x: e.clientX - r.left, y: e.clientY - r.top };
}
function toNatural(e) {
  const p = stagePoint(e);
  return { x: (p.x - state.ox) / state.scale, y: (p.y - state.oy) / state.scale };
}

overlay.addEventListener("pointerdown", (e) => {
  if (!photo() || state.busy) return;
  e.preventDefault();
  stage.focus({ preventScroll: true });
  try { overlay.setPointerCapture(e.pointerId); } catch { /* synthetic pointer */ }
  if (e.button === 1 || state.space) {
    const p = stagePoint(e);
    state.pan = { x: p.x, y: p.y, ox: state.ox, oy: state.oy };
    stage.classList.add("panning");
    return;
  }
  if (e.pointerType === "mouse" && e.button !== 0) return;
  if (state.view !== "result") setView("result");
  // The size is in screen pixels, so the brush looks the same at any zoom.
  state.stroke = { type: "stroke", tool: state.tool, size: Number(brush.value) / state.scale, points: [toNatural(e)] };
  pushOp(state.stroke);
  drawSegment(0);
});

function drawSegment(from) {
  // Only the new segment, on the mask and on the overlay: the photo is not redrawn.
  stats.segments++;
  drawStroke(maskCtx, state.stroke, from, "#fff");
  setTransform(overlayCtx);
  drawStroke(overlayCtx, state.stroke, from, "#f00");
  overlayCtx.setTransform(1, 0, 0, 1, 0, 0);
}

overlay.addEventListener("pointermove", (e) => {
  if (state.pan) {
    const p = stagePoint(e);
    state.ox = state.pan.ox + p.x - state.pan.x;
    state.oy = state.pan.oy + p.y - state.pan.y;
    requestRender(true, true);
  } else if (state.stroke) {
    const events = e.getCoalescedEvents ? e.getCoalescedEvents() : [];
    const from = state.stroke.points.length;
    for (const c of events.length ? events : [e]) state.stroke.points.push(toNatural(c));
    drawSegment(from);
  }
});
const endPointer = () => {
  state.stroke = null;
  state.pan = null;
  stage.classList.remove("panning");
};
overlay.addEventListener("pointerup", endPointer);
overlay.addEventListener("pointercancel", endPointer);

stage.addEventListener("wheel", (e) => {
  if (!photo()) return;
  e.preventDefault();
  const p = stagePoint(e);
  zoomAt(Math.exp(-e.deltaY * 0.002), p.x, p.y);
}, { passive: false });

function setBrush(size) {
  brush.value = String(Math.round(size));
  $("brush-value").value = brush.value + " px";
}
function setTool(tool) {
  state.tool = tool;
  $(tool === "eraser" ? "tool-eraser" : "tool-brush").checked = true;
}
function setComparing(on) {
  if (on && state.current <= 0) return;
  state.comparing = on;
  updateOverlayVisibility();
  requestRender(true, false);
}
const isTyping = (t) => t instanceof HTMLInputElement && !["range", "radio", "file", "checkbox"].includes(t.type);

document.addEventListener("keydown", (e) => {
  if (isTyping(e.target) || e.altKey) return;
  const key = e.key.toLowerCase(), mod = e.ctrlKey || e.metaKey;
  if (mod && key === "z") { e.preventDefault(); e.shiftKey ? redo() : undo(); }
  else if (mod && key === "y") { e.preventDefault(); redo(); }
  else if (mod && key === "enter") { e.preventDefault(); inpaint(); }
  else if (mod) return;
  else if (e.key === "[") setBrush(Math.max(Number(brush.min), Number(brush.value) / 1.25));
  else if (e.key === "]") setBrush(Math.min(Number(brush.max), Number(brush.value) * 1.25));
  else if (key === "b") setTool("brush");
  else if (key === "e") setTool("eraser");
  else if (key === "escape") resetView();
  else if (key === "+" || key === "=" || key === "-") {
    const { w, h } = stageSize();
    zoomAt(key === "-" ? 1 / 1.25 : 1.25, w / 2, h / 2);
  } else if (key === "c" && !e.repeat) setComparing(true);
  else if (["1", "2", "3", "4"].includes(key)) setView(["result", "alpha", "alpha_rgb", "raw"][Number(key) - 1]);
  else if (e.code === "Space" && photo()) {
    if (!(e.target instanceof HTMLButtonElement)) e.preventDefault();  // no page scroll
    state.space = true;
    stage.classList.add("space");
  }
});
document.addEventListener("keyup", (e) => {
  if (e.key.toLowerCase() === "c") setComparing(false);
  if (e.code === "Space") { state.space = false; stage.classList.remove("space"); }
});
window.addEventListener("blur", () => { setComparing(false); state.space = false; });

$("undo").addEventListener("click", undo);
$("redo").addEventListener("click", redo);
$("clear").addEventListener("click", clearMask);
$("zoom-in").addEventListener("click", () => { const { w, h } = stageSize(); zoomAt(1.25, w / 2, h / 2); });
$("zoom-out").addEventListener("click", () => { const { w, h } = stageSize(); zoomAt(1 / 1.25, w / 2, h / 2); });
$("zoom-reset").addEventListener("click", resetView);
brush.addEventListener("input", () => setBrush(brush.value));
for (const radio of document.querySelectorAll('input[name="tool"]')) radio.addEventListener("change", () => setTool(radio.value));
const compareButton = $("compare");
compareButton.addEventListener("pointerdown", () => setComparing(true));
for (const t of ["pointerup", "pointerleave", "pointercancel"]) compareButton.addEventListener(t, () => setComparing(false));
$("compare-slider").addEventListener("input", (e) => {
  state.compareShare = Number(e.target.value) / 100;
  requestRender(true, false);
});
window.addEventListener("resize", () => { resizeCanvases(); resetView(); });

// ------------------------------------------------------------------ images in: file, drop, paste, mask
async function decodeImage(blob) {
  const url = URL.createObjectURL(blob);
  const img = new Image();
  img.src = url;
  try { await img.decode(); } catch {
    URL.revokeObjectURL(url);
    throw new Error("Could not read this image.");
  }
  return { img, url };
}
const isImage = (f) => f && /^image\/(png|jpeg|webp)$/.test(f.type);

async function openImage(file) {
  showError("");
  if (!file) return;
  if (!isImage(file)) { showError("Please choose a PNG, JPEG or WebP image."); return; }
  let decoded;
  try { decoded = await decodeImage(file); } catch (err) { showError(err.message); return; }
  for (const e of state.entries) URL.revokeObjectURL(e.url);
  const name = file.name || "pasted.png";
  state.entries = [{ label: "Original", name, blob: file, ...decoded, source: null, explain: new Map() }];
  state.current = 0;
  mask.width = decoded.img.naturalWidth;
  mask.height = decoded.img.naturalHeight;
  stage.dataset.width = String(mask.width);
  stage.dataset.height = String(mask.height);
  state.ops = []; state.undone = []; state.stroke = null;
  state.view = "result"; $("view-result").checked = true;
  $("hint").hidden = true; view.hidden = overlay.hidden = false;
  resizeCanvases();
  replay();
  resetView();
  renderHistory();
  statusEl.textContent = `${mask.width}×${mask.height}`;
}
$("file").addEventListener("change", (e) => openImage(e.target.files[0]));

["dragenter", "dragover"].forEach((t) => stage.addEventListener(t, (e) => {
  e.preventDefault(); stage.classList.add("dragover");
}));
["dragleave", "drop"].forEach((t) => stage.addEventListener(t, () => stage.classList.remove("dragover")));
stage.addEventListener("drop", (e) => { e.preventDefault(); openImage(e.dataTransfer.files[0]); });
["dragover", "drop"].forEach((t) => window.addEventListener(t, (e) => e.preventDefault()));
document.addEventListener("paste", (e) => {
  const file = [...(e.clipboardData?.files || [])].find(isImage);
  if (file) { e.preventDefault(); openImage(file); }
});

// A ready mask (white = fill) of the photo's size, added to the painted one as one undoable step.
async function openMask(file) {
  showError("");
  if (!file || !photo()) { showError("Open an image first, then its mask."); return; }
  let decoded;
  try { decoded = await decodeImage(file); } catch (err) { showError(err.message); return; }
  const { img, url } = decoded;
  const w = img.naturalWidth, h = img.naturalHeight;
  if (w !== mask.width || h !== mask.height) {
    URL.revokeObjectURL(url);
    showError(`The mask is ${w}×${h}; the image is ${mask.width}×${mask.height}.`);
    return;
  }
  const canvas = document.createElement("canvas");
  canvas.width = w; canvas.height = h;
  const c = canvas.getContext("2d");
  c.drawImage(img, 0, 0);
  URL.revokeObjectURL(url);
  const data = c.getImageData(0, 0, w, h), px = data.data;
  for (let i = 0; i < px.length; i += 4) {  // luminance >= 128 is white, as the server reads it
    const white = 0.299 * px[i] + 0.587 * px[i + 1] + 0.114 * px[i + 2] >= 128;
    px[i] = px[i + 1] = px[i + 2] = 255;
    px[i + 3] = white ? 255 : 0;
  }
  c.putImageData(data, 0, 0);
  const op = { type: "mask", canvas };
  pushOp(op);
  applyOp(op);
  requestRender(false, true);
}
$("mask-file").addEventListener("change", (e) => { openMask(e.target.files[0]); e.target.value = ""; });

// ------------------------------------------------------------------ requests
// FastAPI errors: {"detail": "text"} or, for validation errors, {"detail": [{msg, loc}, ...]}.
async function errorMessage(resp) {
  let detail = null;
  try { detail = (await resp.json()).detail; } catch { /* not JSON */ }
  if (Array.isArray(detail)) detail = detail.map((d) => d.msg || JSON.stringify(d)).join("; ");
  else if (detail && typeof detail !== "string") detail = JSON.stringify(detail);
  return `Error ${resp.status}: ${detail || resp.statusText || "request failed"}`;
}

// Runs `work` with the busy indicator and its elapsed time; errors go inline.
async function busy(text, work) {
  if (state.busy) return;
  state.busy = true;
  stage.dataset.busy = "true";
  showError("");
  $("inpaint").disabled = true;
  $("busy-text").textContent = text;
  $("busy").hidden = false;
  const start = performance.now();
  const seconds = () => ((performance.now() - start) / 1000).toFixed(1) + " s";
  const timer = setInterval(() => { $("elapsed").value = seconds(); }, 100);
  $("elapsed").value = seconds();
  try {
    await work();
    statusEl.textContent = `${text.replace("…", "")} done in ${seconds()}`;
  } catch (err) {
    // fetch() rejects with a TypeError only when the server could not be reached at all.
    showError(err instanceof TypeError ? `Network error: ${err.message}` : err.message || String(err));
  } finally {
    clearInterval(timer);
    $("busy").hidden = true;
    $("inpaint").disabled = false;
    state.busy = false;
    stage.dataset.busy = "false";
  }
}

function post(image, imageName, maskPng, explain) {
  const form = new FormData();
  form.append("image", image, imageName);
  form.append("mask", maskPng, "mask.png");
  form.append("mask_convention", "hole-white");
  if (explain !== undefined) form.append("explain", String(explain));
  return fetch("inpaint", { method: "POST", body: form });
}

function inpaint() {
  if (!photo()) { showError("Choose an image first."); return; }
  if (!state.ops.length) { showError("Paint over the area to fill first."); return; }
  return busy("Inpainting…", async () => {
    const base = entry(), maskPng = await maskBlob();
    const resp = await post(base.blob, base.name, maskPng);
    if (!resp.ok) throw new Error(await errorMessage(resp));
    const blob = await resp.blob();
    const decoded = await decodeImage(blob).catch(() => { throw new Error("The server returned an unreadable image."); });
    const stem = state.entries[0].name.replace(/\.[^.]*$/, "");
    const number = state.current + 1;
    // Keep editing: the result becomes the image the next strokes apply to; later entries
    // (after stepping back) give way to it.
    for (const e of state.entries.splice(state.current + 1)) URL.revokeObjectURL(e.url);
    state.entries.push({
      label: `Result ${number}`, name: `${stem}-inpainted${number > 1 ? "-" + number : ""}.png`, blob, ...decoded,
      source: { image: base.blob, name: base.name, mask: maskPng }, explain: new Map(),
    });
    selectEntry(state.entries.length - 1);
  });
}
$("inpaint").addEventListener("click", inpaint);

// α and C of a result: asked on demand (the same request again, with `explain`), kept per block.
async function explain(target, level) {
  if (target.explain.has(level)) return;
  await busy("Computing α and C…", async () => {
    const { image, name, mask: maskPng } = target.source;
    const resp = await post(image, name, maskPng, level);
    if (!resp.ok) throw new Error(await errorMessage(resp));
    const body = await resp.json();
    const block = body.fusion.find((b) => b.level === level);
    const pictures = {};
    for (const key of ["alpha", "alpha_rgb", "raw"]) {
      const img = new Image();
      img.src = block[key];
      await img.decode();
      pictures[key] = img;
    }
    target.explain.set(level, pictures);
  });
}

async function setView(mode) {
  const target = entry();
  if (mode !== "result" && !target?.source) { $("view-result").checked = true; return; }
  if (mode !== "result") {
    await explain(target, state.level);
    if (!target.explain.has(state.level)) mode = "result";  // it failed: the error is shown
  }
  state.view = mode;
  $(`view-${mode.replace("_", "-")}`).checked = true;
  updateOverlayVisibility();
  requestRender(true, false);
}
for (const radio of document.querySelectorAll('input[name="view"]')) radio.addEventListener("change", () => setView(radio.value));
$("explain-level").addEventListener("change", (e) => {
  state.level = Number(e.target.value);
  setView(state.view);
});

// ------------------------------------------------------------------ history
function selectEntry(index) {
  state.current = index;
  state.ops = []; state.undone = [];
  state.view = "result"; $("view-result").checked = true;
  updateOverlayVisibility();
  replay();
  requestRender(true, true);
  renderHistory();
}

function renderHistory() {
  const list = $("history");
  list.replaceChildren(...state.entries.map((e, i) => {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.index = String(i);
    button.setAttribute("aria-current", String(i === state.current));
    const thumb = document.createElement("img");
    thumb.src = e.url;
    thumb.alt = "";
    button.append(thumb, e.label);
    button.addEventListener("click", () => selectEntry(i));
    item.append(button);
    return item;
  }));
  $("history-section").hidden = state.entries.length < 2;
  const result = state.current > 0 ? entry() : null;
  const download = $("download");
  download.classList.toggle("disabled", !result);
  download.setAttribute("aria-disabled", String(!result));
  if (result) { download.href = result.url; download.download = result.name; }
  else download.removeAttribute("href");
  for (const id of ["view-alpha", "view-alpha-rgb", "view-raw", "explain-level", "compare", "compare-slider"]) {
    $(id).disabled = !result;
  }
  updateButtons();
}

function updateButtons() {
  $("undo").disabled = !state.ops.length;
  $("redo").disabled = !state.undone.length;
  $("clear").disabled = !state.ops.length;
}

// ------------------------------------------------------------------ model info
(async () => {
  const el = $("model-info");
  try {
    const resp = await fetch("model");
    if (!resp.ok) throw new Error(String(resp.status));
    const m = await resp.json();
    const parts = [m.name, m.preset && `preset ${m.preset}`,
      typeof m.parameters === "number" && `${(m.parameters / 1e6).toFixed(2)} M parameters`,
      // A local directory by its name; registry and s3:// sources as they are.
      m.source && `from ${m.source.startsWith("/") ? m.source.split("/").filter(Boolean).pop() : m.source}`,
      m.device && `on ${m.device}`,
      m.inference && `inference path: ${m.inference}`].filter(Boolean);
    el.textContent = "Serving: " + (parts.join(" · ") || "no details");
    const levels = m.config?.fusion_levels;
    if (levels) {
      $("explain-level").replaceChildren(...Array.from({ length: levels }, (_, k) => {
        const option = document.createElement("option");
        option.value = String(k);
        option.textContent = k === 0 ? "0 (finest)" : `${k} (1/${2 ** k})`;
        return option;
      }));
    }
  } catch {
    el.textContent = "Model info unavailable.";
  }
})();

updateButtons();
// For the browser test: render counters, and a promise of the next painted frame.
window.dfnetEditor = { stats, frame: () => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))) };
