// retrain ui: the page. Every text from the server (class names, file names, messages) goes in through
// textContent or attributes, never as HTML markup, so a class called <img onerror=...> shows as written.
"use strict";
const CSRF = document.querySelector('meta[name="csrf-token"]').content;
const $ = (id) => document.getElementById(id);
let S = null;            // the last /api/state
let runId = null;        // run shown in Understand / Try / Export
let watching = null;     // run whose events are being polled
let gallery = {cls: null, page: 0, pages: 1};

function el(tag, attrs = {}, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") e.textContent = v;
    else if (k === "style") e.style.cssText = v;  // CSSOM: allowed by the page's CSP, unlike a style attribute
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== false && v != null) e.setAttribute(k, v === true ? "" : v);
  }
  for (const kid of kids) if (kid != null) e.append(kid);
  return e;
}
const pct = (x) => (x == null ? "–" : (100 * x).toFixed(1) + "%");
const q = (o) => new URLSearchParams(o).toString();

async function api(path, opts = {}) {
  const init = {method: opts.method || "GET", headers: {"X-CSRF-Token": CSRF}};
  if (opts.json !== undefined) { init.body = JSON.stringify(opts.json); init.headers["Content-Type"] = "application/json"; }
  if (opts.form) init.body = opts.form;
  if (init.method !== "GET") init.method = opts.method;
  const r = await fetch(path, init);
  let body = {};
  try { body = await r.json(); } catch (e) { body = {error: `HTTP ${r.status}`}; }
  if (!r.ok) throw new Error(body.error || `HTTP ${r.status}`);
  return body;
}
const post = (path, json) => api(path, {method: "POST", json});

function say(text, ok = false) {
  const m = $("message");
  if (/^[a-z]+[ ,:]/.test(text)) text = text[0].toUpperCase() + text.slice(1);  // a sentence, not a file name
  m.textContent = text; m.hidden = !text; m.className = ok ? "ok" : "";
  document.body.dataset.message = ok ? "ok" : (text ? "error" : "");
}
async function guarded(fn) {
  try { say(""); await fn(); } catch (e) { say(e.message); }
}

// -- navigation --------------------------------------------------------------------------------------
function go(step) {
  if (step !== "data") webcamDone();
  if (step !== "try") { camOff($("try-video")); $("try-webcam").hidden = true; }
  document.body.dataset.step = step;
  for (const s of document.querySelectorAll("section.step")) s.hidden = s.id !== step;
  for (const b of document.querySelectorAll("nav button")) b.classList.toggle("on", b.dataset.go === step);
  const show = {understand: showRun, fix: showFix, try: showTry, export: showExport}[step];
  if (show) guarded(show);
}

let classesSeen = null;  // the class counts the page last showed
async function refresh() {
  S = await api("/api/state");
  const seen = JSON.stringify([S.image_dir, S.classes]);
  if (classesSeen !== null && seen !== classesSeen) photosChanged();
  classesSeen = seen;
  $("image-dir").textContent = S.image_dir;
  $("own-tools").hidden = !S.own_photos;
  $("busy").hidden = !S.training;
  $("busy").textContent = S.training ? `training run ${S.training}…` : "";
  renderClasses();
  renderRunPicker();
  renderInterrupted();
  if (S.training && watching !== S.training && !ended.has(S.training)) watch(S.training);
  document.body.dataset.ready = "1";
}

// -- 1 data ------------------------------------------------------------------------------------------
function renderClasses() {
  const box = $("classes");
  box.replaceChildren();
  if (!S.classes.length) box.append(el("p", {class: "muted", text: S.own_photos
    ? "No classes yet: add one above, then upload photos into it." : "This folder has no class folders."}));
  for (const c of S.classes) {
    const input = el("input", {type: "file", accept: "image/*", multiple: true, hidden: true,
      "data-class": c.name, onchange: (e) => guarded(() => upload(c.name, e.target.files))});
    const actions = el("div", {class: "actions"},
      el("button", {class: "secondary", text: "Browse", onclick: () => guarded(() => openGallery(c.name, 0))}));
    if (S.own_photos) {
      actions.append(el("label", {class: "button", text: "Upload photos"}, input));
      if (navigator.mediaDevices && navigator.mediaDevices.getUserMedia)
        actions.append(el("button", {class: "secondary", text: "Webcam", onclick: () => guarded(() => webcam(c.name))}));
    }
    const card = el("div", {class: "card", "data-class": c.name},
      el("h4", {text: c.name}), el("div", {class: "count", text: String(c.count)}),
      el("div", {class: "muted", text: c.count === 1 ? "photo" : "photos"}), actions);
    box.append(card);
  }
}

// Photos were added, moved or set aside: what the Data step showed of them is redone or marked as old.
function photosChanged() {
  if ($("check-result").children.length) $("check-result").replaceChildren(el("p", {class: "muted", text: "The photos changed since the last check: check them again."}));
  if ($("gallery").hidden) return;
  if (S.classes.some((c) => c.name === gallery.cls)) openGallery(gallery.cls, gallery.page).catch(() => { $("gallery").hidden = true; });
  else $("gallery").hidden = true;
}

async function upload(cls, files, quiet = false) {
  if (!files.length) return;
  const form = new FormData();
  let bytes = 0;
  for (const f of files) { form.append("file", f, f.name); bytes += f.size; }
  if (bytes > S.max_upload_bytes) throw new Error(`${files.length === 1 ? `${files[0].name} is` : `these ${files.length} photos are`} ${(bytes / 2 ** 20).toFixed(0)} MB${files.length === 1 ? "" : " together"}; upload at most ${(S.max_upload_bytes / 2 ** 20).toFixed(0)} MB at a time (nothing was sent)`);
  const r = await api(`/api/classes/${encodeURIComponent(cls)}/photos`, {method: "POST", form});
  await refresh();
  const bad = r.rejected.map((x) => `${x.file}: ${x.reason}`).join("; ");
  if (bad) say(`${r.saved.length ? `Saved ${r.saved.length} photo(s) in ${cls}; refused` : `Nothing saved in ${cls}: refused`} ${r.rejected.length}: ${bad}`);
  else if (!quiet) say(`Saved ${r.saved.length} photo(s) in ${cls}.`, true);
}

// The webcam: one stream per <video> (Data: photos for a class; Try: a picture to classify), stopped on
// "Done" and whenever the page goes to another step.
const cams = new Map();
async function camOn(video) {
  if (!cams.has(video)) {
    let stream;
    try { stream = await navigator.mediaDevices.getUserMedia({video: true}); } catch (e) {
      throw new Error(e.name === "NotAllowedError" ? "the browser may not use the camera: allow it (the icon in the address bar), then try again"
        : e.name === "NotFoundError" ? "no camera found on this machine" : `the camera cannot be used (${e.name}: ${e.message})`);
    }
    cams.set(video, stream);
    video.srcObject = stream;
  }
  await video.play();
}
function camOff(video) {
  const stream = cams.get(video);
  if (stream) stream.getTracks().forEach((t) => t.stop());
  cams.delete(video); video.srcObject = null;
}
async function snapshot(video, name) {
  if (!video.videoWidth) throw new Error("the camera has not sent a picture yet: wait a moment, then try again");
  const c = el("canvas", {width: video.videoWidth, height: video.videoHeight});
  c.getContext("2d").drawImage(video, 0, 0);
  const blob = await new Promise((ok) => c.toBlob(ok, "image/jpeg", 0.92));
  return new File([blob], name, {type: "image/jpeg"});
}

let camClass = null, camTaken = 0;
async function webcam(cls) {
  if (camClass !== cls) camTaken = 0;
  camClass = cls;
  $("webcam-class").textContent = cls; $("webcam-taken").textContent = "";
  $("webcam-box").hidden = false;
  await camOn($("webcam-video"));
  $("webcam-box").scrollIntoView({block: "nearest"});
}
async function webcamSnap() {
  const cls = camClass;
  await upload(cls, [await snapshot($("webcam-video"), `webcam-${Date.now()}.jpg`)], true);
  camTaken++;
  $("webcam-taken").textContent = `${camTaken} photo(s) taken and saved in ${cls}`;
}
function webcamDone() { camOff($("webcam-video")); $("webcam-box").hidden = true; camClass = null; }

async function openGallery(cls, page, run) {
  const params = {class: cls, page};
  if (run) params.run = run;
  const r = await api("/api/images?" + q(params));
  gallery = {cls, page: r.page, pages: r.pages};
  $("gallery").hidden = false;
  $("gallery-name").textContent = cls;
  $("gallery-count").textContent = `${r.total} photos`;
  $("page-no").textContent = `page ${r.page + 1} of ${r.pages}`;
  $("prev-page").disabled = r.page <= 0;
  $("next-page").disabled = r.page + 1 >= r.pages;
  $("thumbs").replaceChildren(...r.images.map((p) => thumb(p)));
}

function thumb(path, run) {
  const params = {path};
  if (run) params.run = run;
  return el("figure", {title: path}, el("img", {loading: "lazy", alt: path, src: "/api/thumb?" + q(params)}),
    el("figcaption", {text: path.split("/").pop()}));
}

async function check() {
  const box = $("check-result");
  box.replaceChildren(el("p", {class: "muted", text: "Checking every photo…"}));
  const r = await api("/api/check");
  const rows = r.classes.map((c) => el("tr", {}, el("th", {text: c.name}), el("td", {text: String(c.count)})));
  const out = [el("table", {id: "counts"}, el("tr", {}, el("th", {text: "class"}), el("th", {text: "usable photos"})), ...rows)];
  if (r.problem) out.push(el("p", {class: "warn", id: "check-problem", text: r.problem}));
  else out.push(el("p", {class: "muted", text: "Ready to train."}));
  if (r.imbalance && r.imbalance >= 3) out.push(el("p", {class: "warn", text: `Class imbalance: the largest class has ${r.imbalance}x the photos of the smallest. Training samples classes evenly, but more photos of the small classes would help.`}));
  for (const n of r.notices) out.push(el("p", {class: "warn", text: n}));
  if (r.skipped_total) {
    out.push(el("h4", {text: `${r.skipped_total} file(s) will be skipped`}));
    out.push(el("ul", {id: "skipped"}, ...r.skipped.map((s) => el("li", {text: `${s.path}: ${s.reason}`}))));
  }
  if (r.duplicates.length) {
    out.push(el("h4", {text: `${r.duplicates.length} group(s) of identical photos`}));
    out.push(el("ul", {}, ...r.duplicates.slice(0, 50).map((d) => el("li", {text: d.paths.join("  =  ")}))));
  }
  box.replaceChildren(...out);
}

// -- 2 train -----------------------------------------------------------------------------------------
function fillForm() {
  const f = $("train-form");
  $("architecture").replaceChildren(...S.backbones.map((b) => el("option", {value: b, text: b})));
  for (const [k, v] of Object.entries(S.defaults)) {
    const input = f.elements[k];
    if (!input) continue;
    if (input.type === "checkbox") input.checked = !!v; else input.value = v == null ? "" : v;
  }
}

function formSettings() {
  const out = {};
  for (const input of $("train-form").elements) {
    if (!input.name) continue;
    if (input.type === "checkbox") out[input.name] = input.checked;
    else if (input.value !== "") out[input.name] = input.type === "number" ? Number(input.value) : input.value;
  }
  return out;
}

async function startTraining(resume) {
  let r;
  try { r = await post("/api/train", resume ? {resume} : {settings: formSettings()}); } catch (e) {
    await refresh();  // e.g. another tab's training: this tab follows it
    throw e;
  }
  await refresh();
  watch(r.run);
}

function renderInterrupted() {
  const box = $("interrupted");
  box.replaceChildren();
  for (const run of S.runs.filter((x) => x.resumable).slice(0, 3)) {
    box.append(el("p", {class: "warn", "data-run": run.id}, `Run ${run.id} was ${run.status} before it finished. `,
      el("button", {class: "secondary", text: "Resume it", onclick: () => guarded(() => startTraining(run.id))})));
  }
}

let curve = [];
const ended = new Set();  // runs this page saw end: never watched again, even while their worker exits
function watch(id) {
  if (watching === id) return;  // one polling loop per run, however many times it is asked for
  ended.delete(id);  // resumed
  watching = id; curve = []; crossfit = []; crossfitAxis = "steps"; runId = id;
  $("acc-caption").replaceChildren("Accuracy by training step (training — / ", el("span", {id: "val-name", text: "validation"}), " ··)");
  $("loss-figure").hidden = false;
  $("progress").hidden = false; $("cancel").hidden = false; $("start").disabled = true;
  $("run-id").textContent = `(run ${id})`; $("log").textContent = ""; $("phase").textContent = "starting";
  $("bar-fill").style.width = "0"; $("rate").textContent = "";
  let since = 0;
  const tick = async () => {
    if (watching !== id) return;
    let r;
    try { r = await api(`/api/runs/${encodeURIComponent(id)}/events?since=${since}`); } catch (e) { say(e.message); return; }
    since = r.next;
    for (const ev of r.events) onEvent(ev);
    if (curve.length || crossfit.length) drawCurves();
    document.body.dataset.training = r.status;
    if (r.status === "running") { setTimeout(tick, 700); return; }
    watching = null; ended.add(id);
    $("cancel").hidden = true; $("start").disabled = false;
    if (r.status === "finished") $("bar-fill").style.width = "100%";
    $("phase").textContent = r.status;
    await refresh();
    if (r.status === "finished") say(`Training finished: see step 3 Understand.`, true);
  };
  tick();
}

function onEvent(ev) {
  if (ev.kind === "phase") $("phase").textContent = {discover: "finding photos", extract: "computing features",
    train: "training the new layer", export: "testing and writing the model", report: "writing the report"}[ev.phase] || ev.phase;
  else if (ev.kind === "extract") {
    $("bar-fill").style.width = ev.total ? `${(100 * ev.done / ev.total).toFixed(1)}%` : "100%";
    $("rate").textContent = `${ev.done} / ${ev.total} photos, ${ev.rate} photos/s` + (ev.eta != null ? `, about ${Math.ceil(ev.eta)} s left` : "");
  } else if (ev.kind === "step") {
    curve.push(ev);
    const steps = Number($("train-form").elements.how_many_training_steps.value) || ev.step;
    $("bar-fill").style.width = `${Math.min(100, 100 * ev.step / steps).toFixed(1)}%`;
    $("rate").textContent = `step ${ev.step}: train accuracy ${pct(ev.train_accuracy)}` + (ev.validation_accuracy != null ? `, validation ${pct(ev.validation_accuracy)}` : "");
  } else if (ev.kind === "crossfit") {
    crossfit = ev.points; crossfitAxis = ev.axis || "steps";
    if (crossfitAxis === "C") {  // a solved layer: no steps, one point per regularisation strength tried
      $("acc-caption").textContent = `Out-of-fold accuracy (${ev.folds} folds) by regularisation C, log scale: the layer is solved, not stepped, and C is chosen by the out-of-fold cross entropy`;
      $("loss-figure").hidden = true;
    } else $("val-name").textContent = `out-of-fold, ${ev.folds} folds`;
  } else if (ev.kind === "log") {
    $("log").textContent += ev.message + "\n";
    $("log").scrollTop = $("log").scrollHeight;
  } else if (ev.kind === "error") {
    say(ev.message);
  }
}

// One chart: lines on a common step axis (xs: every step shown), a dot where a line has one point.
function polyline(svg, points, cls, xs) {
  if (points.length < 1) return;
  const ys = points.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs);
  const y0 = svg.dataset.min !== undefined ? Number(svg.dataset.min) : Math.min(...ys);
  const y1 = svg.dataset.max !== undefined ? Number(svg.dataset.max) : Math.max(...ys);
  const sx = (x) => 10 + 380 * (x1 === x0 ? 0.5 : (x - x0) / (x1 - x0));
  const sy = (y) => 150 - 140 * (y1 === y0 ? 0.5 : (y - y0) / (y1 - y0));
  const ns = "http://www.w3.org/2000/svg";
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", points.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" "));
  if (cls) line.setAttribute("class", cls);
  svg.append(line);
  if (points.length === 1) {
    const dot = document.createElementNS(ns, "circle");
    dot.setAttribute("cx", sx(points[0][0]).toFixed(1)); dot.setAttribute("cy", sy(points[0][1]).toFixed(1)); dot.setAttribute("r", "4");
    if (cls) dot.setAttribute("class", cls);
    svg.append(dot);
  }
}

let crossfit = [];  // the cross-fit's out-of-fold accuracy per number of steps (or per C), when the run has one
let crossfitAxis = "steps";
function drawCurves() {
  const acc = $("acc-chart"), loss = $("loss-chart");
  acc.replaceChildren(); loss.replaceChildren();
  acc.dataset.min = 0; acc.dataset.max = 1;
  if (crossfitAxis === "C") {
    const points = crossfit.map(([c, a]) => [Math.log10(c), a]);
    return polyline(acc, points, "val", points.map((p) => p[0]));
  }
  const val = crossfit.length ? crossfit : curve.filter((e) => e.validation_accuracy != null).map((e) => [e.step, e.validation_accuracy]);
  const xs = [...curve.map((e) => e.step), ...val.map((p) => p[0])];
  if (!xs.length) return;
  polyline(acc, curve.map((e) => [e.step, e.train_accuracy]), "", xs);
  polyline(acc, val, "val", xs);
  polyline(loss, curve.map((e) => [e.step, e.cross_entropy]), "", curve.map((e) => e.step));
}

// -- 3 understand ------------------------------------------------------------------------------------
function renderRunPicker() {
  const pick = $("run-pick");
  const finished = S.runs.filter((r) => r.status === "finished");
  if (!runId || !S.runs.some((r) => r.id === runId && r.status === "finished")) runId = finished.length ? finished[0].id : null;
  pick.replaceChildren(...finished.map((r) => el("option", {value: r.id, selected: r.id === runId,
    text: `${r.id} · ${r.architecture || ""} · test ${pct(r.test_accuracy)}`})));
}

async function currentRun() {
  if (!runId) return null;
  return api(`/api/runs/${encodeURIComponent(runId)}`);
}

function notYet(box, text) {
  box.replaceChildren(el("div", {class: "na", text}));
}

async function showRun() {
  const run = await currentRun();
  const box = $("summary");
  for (const id of ["report-frame", "per-class", "confusion", "cell-photos"]) $(id).replaceChildren();
  if (!run) return notYet(box, "No finished run yet: train one on step 2.");
  const m = run.metrics || {};
  const val = m.validation_accuracy == null ? "" : `; validation ${pct(m.validation_accuracy)}${m.validation_kind ? ` (${m.validation_kind})` : ""}`;
  box.replaceChildren(el("p", {}, "Test accuracy ", el("span", {class: "big", id: "accuracy", text: pct(m.test_accuracy)}),
    el("span", {class: "muted", text: ` on ${m.test_count} test photos ${m.final_fit === "all" ? "measured before the model learned from them too (every photo counts)" : "never used in training"}${val}; ${m.final_fit_count || m.train_count} photos trained on; ${m.skipped_files || 0} skipped`})));
  if (run.has_report) {
    $("report-frame").append(el("h3", {text: "The run's full report"}),
      el("p", {class: "muted", text: "The suspected label errors it lists can be moved or set aside on step 4 Fix, without the command line."}),
      el("iframe", {sandbox: "", title: "report", src: `/api/runs/${encodeURIComponent(run.id)}/files/report.html`}));
  }
  const c = run.confusion;
  if (!c) return notYet($("confusion"), "This run has no confusion matrix (it was trained without the app, or stopped before the end).");
  const perClass = c.labels.map((label, i) => {
    const row = c.matrix[i], n = row.reduce((a, b) => a + b, 0);
    const col = c.matrix.reduce((a, r) => a + r[i], 0);
    return el("tr", {}, el("th", {text: label}), el("td", {text: String(n)}),
      el("td", {text: n ? pct(row[i] / n) : "–"}), el("td", {text: col ? pct(row[i] / col) : "–"}));
  });
  $("per-class").replaceChildren(el("h3", {text: "Per class (test photos)"}), el("table", {},
    el("tr", {}, el("th", {text: "class"}), el("th", {text: "photos"}), el("th", {text: "recall"}), el("th", {text: "precision"})), ...perClass));
  const head = el("tr", {}, el("th", {text: "true \\ predicted"}), ...c.labels.map((l) => el("th", {text: l})));
  const rows = c.labels.map((label, i) => el("tr", {}, el("th", {text: label}), ...c.matrix[i].map((n, j) =>
    el("td", {class: `cell ${i === j ? "diag" : (n ? "off" : "")}`, "data-cell": `${i},${j}`, text: String(n),
      onclick: (e) => { for (const t of document.querySelectorAll("td.sel")) t.classList.remove("sel"); e.target.classList.add("sel");
        const photos = c.cells[`${i},${j}`] || [];
        $("cell-photos").replaceChildren(el("p", {class: "muted", text: `${photos.length} photo(s) of ${label} predicted as ${c.labels[j]}`}),
          ...photos.slice(0, 200).map((p) => thumb(p, run.id))); }}))));
  $("confusion").replaceChildren(el("table", {id: "matrix"}, head, ...rows));
}

// -- 4 fix -------------------------------------------------------------------------------------------
let fixPage = 0, fixAll = false;
async function showFix() {
  const box = $("fix-body");
  if (!S.features.relabel) {
    return notYet(box, "Not available in this version: reviewing suspected label errors and duplicates (keep / move / set aside, with undo) needs retrain's relabel module, which this installation does not have yet. Meanwhile the Data step lists identical photos, and the confusion matrix on step 3 shows the photos the model got wrong.");
  }
  if (!runId) return notYet(box, "No finished run yet: train one on step 2.");
  const r = await api(`/api/runs/${encodeURIComponent(runId)}/issues?` + q({page: fixPage, all: fixAll ? 1 : 0}));
  if (!r.has_audit) return notYet(box, `Run ${runId} has no list of suspected label errors (label_issues.csv): it was trained by a version without the audit, or with it turned off. Train again to get one.`);
  const where = r.own_photos ? "" : ` Moves happen in your folder ${r.image_dir}; set-aside photos go to a folder beside it; Undo puts them back.`;
  const pct0 = Math.round(100 * (1 - r.suspect_score));
  const summary = r.suspects
    ? `${r.suspects} suspected label error(s) among ${r.total} photos: a model trained without the photo gives its label less than ${pct0}%.`
    : `No suspected label error among ${r.total} photos: a model trained without the photo gives each one's label at least ${pct0}%.`;
  const toggle = el("button", {class: "secondary", id: "fix-all", text: fixAll ? "Show only the suspects" : "Show every photo, least believed label first",
    onclick: () => { fixAll = !fixAll; fixPage = 0; guarded(showFix); }});
  const head = [el("p", {id: "fix-summary", text: summary}),
    el("p", {class: "muted", text: `Keep a photo, move it to another class, or set it aside.${where} Then train again on step 2: the features are cached, so it is fast.`}),
    el("div", {class: "row"}, el("button", {class: "secondary", id: "undo", text: "Undo last", onclick: () => guarded(async () => { const u = await post(`/api/runs/${encodeURIComponent(runId)}/undo`, {}); say(`Undone: ${u.undone.action} of ${u.undone.path}` + (u.problems.length ? `; ${u.problems.join("; ")}` : ""), !u.problems.length); await showFix(); })}),
      toggle, ...(r.pages > 1 ? [
      el("button", {class: "secondary", text: "← Previous", disabled: r.page <= 0, onclick: () => { fixPage--; guarded(showFix); }}),
      el("span", {text: `page ${r.page + 1} of ${r.pages}`}),
      el("button", {class: "secondary", text: "Next →", disabled: r.page + 1 >= r.pages, onclick: () => { fixPage++; guarded(showFix); }})] : []))];
  const act = (path, action, to) => guarded(async () => { await post(`/api/runs/${encodeURIComponent(runId)}/fix`, {path, action, to}); await refresh(); await showFix(); });
  const cards = r.issues.map((it) => {
    const pick = el("select", {}, ...r.classes.map((c) => el("option", {value: c, selected: c === it.suggested, text: c})));
    const done = it.decision ? el("p", {class: "decision", text: {keep: "kept as is", move: `moved to ${it.decision.to}`, set_aside: "set aside"}[it.decision.action]}) : null;
    const name = it.path.split("/").pop();
    // a moved photo is shown from its new place; a set-aside one is outside the photo folder
    const shown = !it.decision || it.decision.action === "keep" ? it.path : (it.decision.action === "move" ? `${it.decision.to}/${(it.decision.moved_to || [name])[0].split("/").pop()}` : null);
    return el("div", {class: `card issue${it.suspect ? " suspect" : ""}`, "data-path": it.path},
      shown ? el("img", {loading: "lazy", alt: it.path, src: "/api/thumb?" + q({path: shown, run: runId})}) : el("div", {class: "na", text: "(set aside)"}),
      el("h4", {text: name, title: it.path}),
      it.suspect ? el("span", {class: "badge", text: "suspect"}) : null,
      el("p", {class: "muted", text: it.suspect ? `labelled “${it.given}”, looks like “${it.suggested}”` : `labelled “${it.given}”; next best “${it.suggested}”`}), done,
      it.decision ? null : el("div", {class: "actions"}, pick,
        el("button", {text: "Move", title: "move the photo to the chosen class", onclick: () => act(it.path, "move", pick.value)})),
      it.decision ? null : el("div", {class: "actions"},
        el("button", {class: "secondary", text: "Keep", title: "its label is right", onclick: () => act(it.path, "keep")}),
        el("button", {class: "secondary", text: "Set aside", title: "out of the photo folder, into a folder beside it", onclick: () => act(it.path, "set_aside")})));
  });
  const dups = r.duplicates.length ? [el("h3", {text: `${r.duplicates.length} duplicate pair(s)`}), el("div", {class: "cards"}, ...r.duplicates.slice(0, 48).map((d) =>
    el("div", {class: "card"}, el("div", {class: "thumbs"}, thumb(d.a, runId), thumb(d.b, runId)),
      el("p", {class: "muted", text: `${d.kind} ${d.similarity}: ${d.label_a} / ${d.label_b}`}),
      d.decision_b ? el("p", {class: "muted", text: "second one set aside"}) :
        el("button", {class: "secondary", text: "Set the second aside", onclick: () => act(d.b, "set_aside")}))))] : [];
  box.replaceChildren(...head, el("div", {class: "cards issues"}, ...cards), ...dups);
}

// -- 5 try -------------------------------------------------------------------------------------------
async function showTry() {
  $("try-run").textContent = runId || "(none yet)";
  if (!runId) notYet($("try-result"), "No finished run yet: train one on step 2.");
}

async function classify(file) {
  if (!runId) throw new Error("no trained model yet: train one on step 2");
  const form = new FormData();
  form.append("file", file, file.name);
  document.body.dataset.tried = "";
  const r = await api(`/api/runs/${encodeURIComponent(runId)}/classify`, {method: "POST", form});
  const top = r.predictions[0] || {};
  const rows = r.predictions.slice(0, 5).map((p) => el("div", {class: "pred"}, el("span", {class: "label", text: p.label}),
    el("span", {class: "track"}, el("span", {class: "fill", style: `display:block;width:${(100 * p.score).toFixed(1)}%`})),
    el("span", {class: "score", text: pct(p.score)})));
  const extra = [];
  if (r.unknown) extra.push(el("p", {class: "warn", id: "unknown", text: "The model says: unknown (this photo looks like none of its classes)."}));
  if (r.unknown_score != null) extra.push(el("p", {class: "muted", text: `unknown score ${r.unknown_score.toFixed(3)}` + (r.unknown_threshold != null ? ` (above ${r.unknown_threshold.toFixed(3)} the answer is “unknown”)` : " (higher: less like any class)")}));
  $("try-result").replaceChildren(el("img", {src: URL.createObjectURL(file), alt: file.name, style: "max-width:220px;border-radius:6px"}),
    el("h3", {id: "top-label", text: r.unknown ? "unknown" : (top.label || "?")}), ...extra, ...rows);
  if (r.labels) showLabelSet(r);
  document.body.dataset.tried = "1";
}

// A multi-label model: the heading is the set of labels at or above their threshold; each bar shows its threshold.
function showLabelSet(r) {
  $("top-label").textContent = r.labels.length ? `labels: ${r.labels.join(", ")}` : "no label above its threshold";
  $("top-label").classList.toggle("muted", !r.labels.length);
  const chosen = new Set(r.labels);
  for (const row of $("try-result").querySelectorAll(".pred")) {
    const label = row.querySelector(".label").textContent, t = r.thresholds[label];
    row.classList.add("multi");
    row.classList.toggle("chosen", chosen.has(label));
    if (t == null) continue;
    row.querySelector(".track").append(el("span", {class: "tick", title: `threshold ${pct(t)}`, style: `left:${(100 * t).toFixed(1)}%`}));
    row.querySelector(".score").textContent += ` (threshold ${Math.round(100 * t)}%)`;
  }
}

// -- 6 export ----------------------------------------------------------------------------------------
async function showExport() {
  const run = await currentRun();
  const box = $("export-body");
  if (!run || !run.model) return notYet(box, "No finished run yet: train one on step 2.");
  const href = (f) => `/api/runs/${encodeURIComponent(run.id)}/files/${encodeURIComponent(f)}`;
  const models = run.files.filter((f) => f.endsWith(".onnx") || f.endsWith(".tflite") || f.endsWith(".mlmodel"));
  const list = el("ul", {}, ...models.map((f) => el("li", {}, el("a", {href: href(f), download: f, id: f === "output_graph.onnx" ? "download-model" : null, text: f}),
    el("span", {class: "muted", text: f.includes(".int8.") ? "  8-bit, smaller and faster on CPUs" : (f.includes(".fp16.") ? "  half precision" : "  float32: pixels in, probabilities out, labels inside")}))));
  const others = run.files.filter((f) => !models.includes(f)).map((f) => el("li", {}, el("a", {href: href(f), download: f, text: f})));
  box.replaceChildren(el("h3", {text: "Models"}), list,
    models.some((f) => f.includes(".int8.")) ? null : el("p", {class: "muted"}, "No int8 model in this run: choose “Also write: int8 model” in the advanced settings on step 2, or run ",
      el("code", {text: "retrain export --graph output_graph.onnx --to onnx-int8 --output model.int8.onnx"})),
    el("h3", {text: "Use it"}), el("pre", {text: `pip install retrain        # or only onnxruntime, see docs/deploy.md
label_image --graph output_graph.onnx --image photo.jpg

import retrain
clf = retrain.load("output_graph.onnx")
print(clf.classify("photo.jpg")[0][0])   # Prediction(label=..., score=...)

retrain serve --graph output_graph.onnx   # HTTP API + page`}),
    el("h3", {text: "Other files of the run"}), el("ul", {}, ...others));
}

// -- wiring ------------------------------------------------------------------------------------------
function wire() {
  for (const b of document.querySelectorAll("nav button")) b.addEventListener("click", () => go(b.dataset.go));
  $("use-folder").addEventListener("click", () => guarded(async () => { await post("/api/source", {image_dir: $("folder").value.trim()}); await refresh(); $("check-result").replaceChildren(); $("gallery").hidden = true; }));
  $("use-own").addEventListener("click", () => guarded(async () => { await post("/api/source", {own: true}); await refresh(); $("gallery").hidden = true; }));
  $("add-class").addEventListener("click", () => guarded(async () => { const r = await post("/api/classes", {name: $("new-class").value}); $("new-class").value = ""; await refresh(); say(`Class ${r.name} is ready: upload photos into it.`, true); }));
  $("new-class").addEventListener("keydown", (e) => { if (e.key === "Enter") $("add-class").click(); });
  $("prev-page").addEventListener("click", () => guarded(() => openGallery(gallery.cls, gallery.page - 1)));
  $("next-page").addEventListener("click", () => guarded(() => openGallery(gallery.cls, gallery.page + 1)));
  $("check").addEventListener("click", () => guarded(check));
  $("start").addEventListener("click", () => guarded(() => startTraining(null)));
  $("cancel").addEventListener("click", () => guarded(async () => { await post("/api/train/cancel", {}); say("Training cancelled; it can be resumed.", true); }));
  $("run-pick").addEventListener("change", (e) => { runId = e.target.value; guarded(showRun); });
  $("try-file").addEventListener("change", (e) => e.target.files[0] && guarded(() => classify(e.target.files[0])));
  $("webcam-snap").addEventListener("click", () => guarded(webcamSnap));
  $("webcam-done").addEventListener("click", webcamDone);
  if (navigator.mediaDevices && navigator.mediaDevices.getUserMedia) $("try-cam-or").hidden = false;
  $("try-cam").addEventListener("click", () => guarded(async () => { $("try-webcam").hidden = false; await camOn($("try-video")); }));
  $("try-snap").addEventListener("click", () => guarded(async () => classify(await snapshot($("try-video"), `webcam-${Date.now()}.jpg`))));
  $("try-cam-done").addEventListener("click", () => { camOff($("try-video")); $("try-webcam").hidden = true; });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); const f = e.dataTransfer.files[0]; if (f) guarded(() => classify(f)); });
}

wire();
guarded(async () => { await refresh(); fillForm(); });
