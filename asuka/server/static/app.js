// asuka serve: the page. Plain JS, no build step. Talks to the REST API documented at /docs.
"use strict";
const $ = (id) => document.getElementById(id);
const imageCanvas = $("image-canvas"), maskCanvas = $("mask-canvas");
const imageCtx = imageCanvas.getContext("2d"), maskCtx = maskCanvas.getContext("2d");
const state = { methods: {}, imageBlob: null, tool: "brush", undo: [], redo: [], job: null, source: null,
                drawing: false, last: null };

function setStatus(text, error = false) { $("status").textContent = text; $("status").classList.toggle("error", error); }

// ------------------------------------------------------------------ image and mask
async function loadImage(blob) {
  const bitmap = await createImageBitmap(blob);
  state.imageBlob = blob;
  for (const c of [imageCanvas, maskCanvas]) { c.width = bitmap.width; c.height = bitmap.height; }
  imageCtx.drawImage(bitmap, 0, 0);
  maskCtx.clearRect(0, 0, maskCanvas.width, maskCanvas.height);
  state.undo = []; state.redo = [];
  $("empty").hidden = true; showResult(false);
}

async function loadMask(blob) {
  const bitmap = await createImageBitmap(blob);
  const tmp = new OffscreenCanvas(maskCanvas.width, maskCanvas.height), ctx = tmp.getContext("2d");
  ctx.drawImage(bitmap, 0, 0, tmp.width, tmp.height);
  const data = ctx.getImageData(0, 0, tmp.width, tmp.height), px = data.data;
  for (let i = 0; i < px.length; i += 4) {               // white (>= 128) = hole -> painted red
    const hole = (px[i] + px[i + 1] + px[i + 2]) / 3 >= 128 && px[i + 3] >= 128;
    px[i] = 255; px[i + 1] = 0; px[i + 2] = 0; px[i + 3] = hole ? 255 : 0;
  }
  snapshot(); maskCtx.putImageData(data, 0, 0);
}

function maskBlob() {                                     // painted pixels -> white on black PNG
  const out = new OffscreenCanvas(maskCanvas.width, maskCanvas.height), ctx = out.getContext("2d");
  const data = maskCtx.getImageData(0, 0, maskCanvas.width, maskCanvas.height), px = data.data;
  for (let i = 0; i < px.length; i += 4) {
    const v = px[i + 3] > 0 ? 255 : 0;
    px[i] = px[i + 1] = px[i + 2] = v; px[i + 3] = 255;
  }
  ctx.putImageData(data, 0, 0);
  return out.convertToBlob({ type: "image/png" });
}

function snapshot() {
  state.undo.push(maskCtx.getImageData(0, 0, maskCanvas.width, maskCanvas.height));
  if (state.undo.length > 50) state.undo.shift();
  state.redo = [];
}
function restore(from, to) {
  if (!from.length) return;
  to.push(maskCtx.getImageData(0, 0, maskCanvas.width, maskCanvas.height));
  maskCtx.putImageData(from.pop(), 0, 0);
}

function point(event) {
  const r = maskCanvas.getBoundingClientRect();
  return [(event.clientX - r.left) * maskCanvas.width / r.width, (event.clientY - r.top) * maskCanvas.height / r.height];
}
function stroke(from, to) {
  maskCtx.globalCompositeOperation = state.tool === "eraser" ? "destination-out" : "source-over";
  maskCtx.strokeStyle = maskCtx.fillStyle = "rgb(255,0,0)";
  maskCtx.lineWidth = Number($("size").value) * maskCanvas.width / maskCanvas.getBoundingClientRect().width;
  maskCtx.lineCap = maskCtx.lineJoin = "round";
  maskCtx.beginPath(); maskCtx.moveTo(...from); maskCtx.lineTo(...to); maskCtx.stroke();
}
maskCanvas.addEventListener("pointerdown", (e) => {
  if (!state.imageBlob) return;
  snapshot(); state.drawing = true; state.last = point(e); stroke(state.last, state.last);
  maskCanvas.setPointerCapture(e.pointerId);
});
maskCanvas.addEventListener("pointermove", (e) => {
  if (!state.drawing) return;
  const p = point(e); stroke(state.last, p); state.last = p;
});
for (const type of ["pointerup", "pointercancel"]) maskCanvas.addEventListener(type, () => { state.drawing = false; });

function setSize(v) { v = Math.max(2, Math.min(200, v)); $("size").value = v; $("size-value").textContent = v; }
$("size").addEventListener("input", () => setSize(Number($("size").value)));
function setTool(tool) { state.tool = tool; $("brush").classList.toggle("active", tool === "brush");
                         $("eraser").classList.toggle("active", tool === "eraser"); }
$("brush").onclick = () => setTool("brush");
$("eraser").onclick = () => setTool("eraser");
$("undo").onclick = () => restore(state.undo, state.redo);
$("redo").onclick = () => restore(state.redo, state.undo);
$("clear").onclick = () => { snapshot(); maskCtx.clearRect(0, 0, maskCanvas.width, maskCanvas.height); };
$("image-file").onchange = (e) => e.target.files[0] && loadImage(e.target.files[0]);
$("mask-file").onchange = (e) => e.target.files[0] && state.imageBlob && loadMask(e.target.files[0]);
document.addEventListener("paste", (e) => {
  const item = [...e.clipboardData.items].find((i) => i.type.startsWith("image/"));
  if (item) loadImage(item.getAsFile());
});
document.addEventListener("keydown", (e) => {
  if (e.target.matches("input, textarea, select")) return;
  if (e.key === "[") setSize(Number($("size").value) - 4);
  if (e.key === "]") setSize(Number($("size").value) + 4);
  if (e.key === "b" || e.key === "B") compare(true);
  if ((e.ctrlKey || e.metaKey) && e.key === "z") restore(state.undo, state.redo);
  if ((e.ctrlKey || e.metaKey) && e.key === "y") restore(state.redo, state.undo);
});
document.addEventListener("keyup", (e) => { if (e.key === "b" || e.key === "B") compare(false); });

// ------------------------------------------------------------------ methods and their declared options
async function loadMethods() {
  const response = await fetch("/api/methods"), body = await response.json();
  for (const m of body.methods) {
    state.methods[m.name] = m;
    $("method").add(new Option(m.name, m.name));
  }
  for (const u of body.unavailable) {
    const o = new Option(`${u.name} (unavailable)`, u.name); o.disabled = true; o.title = u.reason; $("method").add(o);
  }
  $("method").value = body.default in state.methods ? body.default : body.methods[0].name;
  buildForm();
}

function field(name, schema, value) {
  const label = document.createElement("label");
  label.title = (schema.description || "") + (schema["x-source"] ? ` (${schema["x-source"]})` : "");
  label.append(name + " ");
  let input;
  if (schema.enum) {
    input = document.createElement("select");
    for (const v of schema.enum) input.add(new Option(String(v), JSON.stringify(v)));
    input.value = JSON.stringify(value);
  } else if (schema.type === "boolean") {
    input = document.createElement("input"); input.type = "checkbox"; input.checked = Boolean(value);
  } else if (schema.type === "integer" || schema.type === "number") {
    input = document.createElement("input"); input.type = "number"; input.step = schema.type === "integer" ? "1" : "any";
    if (schema.minimum !== undefined) input.min = schema.minimum;
    if (schema.maximum !== undefined) input.max = schema.maximum;
    input.value = value ?? "";
  } else {
    input = document.createElement("input"); input.type = "text";
    input.value = value === undefined || value === null ? "" : (typeof value === "string" ? value : JSON.stringify(value));
  }
  input.dataset.option = name; input.dataset.type = schema.enum ? "enum" : schema.type || "json";
  label.append(input);
  return label;
}

function buildForm() {
  const m = state.methods[$("method").value], props = m.schema.properties;
  $("method-help").textContent = m.description;
  const presets = m.schema["x-presets"] || {};
  $("preset").replaceChildren(new Option("(none)", ""), ...Object.keys(presets).map((p) => new Option(p, p)));
  $("options").replaceChildren(...Object.entries(props.options.properties).map(([k, s]) => field(k, s, s.default)));
  $("inputs").replaceChildren(...Object.entries(props.inputs.properties).map(([role, s]) => {
    const label = document.createElement("label");
    label.title = s.description || "";
    label.append(role.replace(/_/g, " ") + (props.inputs.required.includes(role) ? " (required) " : " "));
    const input = document.createElement(s["x-kind"] === "image" ? "input" : "textarea");
    if (s["x-kind"] === "image") { input.type = "file"; input.accept = "image/*"; } else { input.rows = 2; input.value = s.default || ""; }
    input.dataset.role = role; label.append(input);
    return label;
  }));
}
$("method").onchange = buildForm;
$("preset").onchange = () => {
  const preset = (state.methods[$("method").value].schema["x-presets"] || {})[$("preset").value];
  if (!preset) return;
  for (const [k, v] of Object.entries(preset.values)) {
    const input = document.querySelector(`[data-option="${k}"]`);
    if (!input) continue;
    if (input.type === "checkbox") input.checked = Boolean(v); else if (input.tagName === "SELECT") input.value = JSON.stringify(v);
    else input.value = typeof v === "string" ? v : (typeof v === "number" ? v : JSON.stringify(v));
  }
};

function optionValues() {
  const out = {};
  for (const input of document.querySelectorAll("[data-option]")) {
    const t = input.dataset.type;
    if (t === "boolean") out[input.dataset.option] = input.checked;
    else if (t === "enum") out[input.dataset.option] = JSON.parse(input.value);
    else if (t === "integer" || t === "number") { if (input.value !== "") out[input.dataset.option] = Number(input.value); }
    else if (t === "string") out[input.dataset.option] = input.value;
    else if (input.value !== "") { try { out[input.dataset.option] = JSON.parse(input.value); } catch { out[input.dataset.option] = input.value; } }
  }
  return out;
}

// ------------------------------------------------------------------ running
async function run() {
  if (!state.imageBlob) return setStatus("Open an image first.", true);
  const form = new FormData();
  form.append("image", state.imageBlob, "image.png");
  form.append("mask", await maskBlob(), "mask.png");
  form.append("method", $("method").value);
  form.append("seed", $("seed").value || "0");
  form.append("options", JSON.stringify(optionValues()));
  if ($("preset").value) form.append("preset", $("preset").value);
  for (const input of document.querySelectorAll("[data-role]")) {
    if (input.type === "file") { if (input.files[0]) form.append("input_" + input.dataset.role, input.files[0]); }
    else if (input.value !== "") form.append("input_" + input.dataset.role, input.value);
  }
  setStatus("Submitting…"); $("progress").value = 0;
  const response = await fetch("/api/jobs", { method: "POST", body: form });
  const body = await response.json();
  if (!response.ok) return setStatus(body.error, true);
  state.job = body.id; $("cancel").disabled = false; $("run").disabled = true;
  follow(body.id);
}

function follow(id) {
  const source = new EventSource(`/api/jobs/${id}/events`);
  state.source = source;
  source.onmessage = (event) => {
    const s = JSON.parse(event.data);
    if (s.state === "queued") setStatus(`Queued (${s.position} ahead)`);
    if (s.state === "running") { setStatus(s.total ? `Step ${s.step} of ${s.total}` : "Running…");
                                 $("progress").value = s.total ? s.step / s.total : 0; }
    if (["done", "failed", "cancelled"].includes(s.state)) {
      source.close(); $("cancel").disabled = true; $("run").disabled = false;
      if (s.state === "done") { $("progress").value = 1; setStatus("Done."); showResult(true, `/api/jobs/${id}/result`); }
      else setStatus(s.state === "failed" ? s.error : "Cancelled.", s.state === "failed");
    }
  };
}

function showResult(show, url) {
  $("result").hidden = !show; $("result-tools").hidden = !show;
  if (show) { $("result").src = url; $("download").href = url; }
}
function compare(on) { if (!$("result-tools").hidden) $("result").style.visibility = on ? "hidden" : "visible"; }
$("compare").addEventListener("pointerdown", () => compare(true));
for (const type of ["pointerup", "pointerleave"]) $("compare").addEventListener(type, () => compare(false));
$("iterate").onclick = async () => loadImage(await (await fetch($("result").src)).blob());
$("run").onclick = run;
$("cancel").onclick = () => state.job && fetch(`/api/jobs/${state.job}`, { method: "DELETE" });
setInterval(async () => {
  try { const q = await (await fetch("/api/queue")).json(); $("queue").textContent = `queue: ${q.waiting}`; } catch {}
}, 2000);
loadMethods();
