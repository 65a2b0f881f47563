// meshtrain dashboard: reads /api/session, then follows /api/events (server-sent events).
// Everything from the mesh is shown with textContent, never as HTML: worker output is untrusted.
"use strict";

const S = { csrf: null, loginRequired: false, loggedIn: false, open: true, body: null, jobs: new Map(),
            selected: null, charts: new Map(), chartJob: null, es: null, checkpoints: [], runs: [], sweeps: [], exports: [],
            history: new Map(), xaxis: "step" };
const $ = (id) => document.getElementById(id);
const LOG_KEPT = 500;

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v; else if (k.startsWith("data-")) e.setAttribute(k, v);
    else if (k === "title") e.title = v; else e[k] = v;
  }
  for (const kid of kids) {
    if (kid === null || kid === undefined) continue;
    e.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return e;
}
const num = (v) => typeof v === "number" && isFinite(v);
const fmt = {
  n: (v, d = 0) => num(v) ? v.toLocaleString(undefined, { maximumFractionDigits: d, minimumFractionDigits: d }) : "—",
  loss: (v) => num(v) ? (Math.abs(v) >= 100 ? v.toFixed(0) : v.toPrecision(4)) : "—",
  pct: (v) => num(v) ? (v * 100).toFixed(1) + "%" : "—",
  gb: (v) => num(v) ? (v < 1 ? (v * 1024).toFixed(0) + " MB" : v.toFixed(v < 10 ? 1 : 0) + " GB") : "—",
  dur: (s) => { if (!num(s)) return "—"; s = Math.round(s); const h = Math.floor(s / 3600), m = Math.floor(s % 3600 / 60);
                return h ? `${h}h${String(m).padStart(2, "0")}m` : m ? `${m}m${String(s % 60).padStart(2, "0")}s` : `${s}s`; },
  clock: (t) => num(t) ? new Date(t * 1000).toLocaleTimeString() : "—",
  when: (t) => num(t) ? new Date(t * 1000).toLocaleString() : "—",
  bytes: (b) => !num(b) ? "—" : b >= 1e9 ? (b / 1e9).toFixed(1) + " GB" : b >= 1e6 ? (b / 1e6).toFixed(1) + " MB"
                : b >= 1e3 ? (b / 1e3).toFixed(1) + " kB" : b + " B",
};
const FINISHED = new Set(["done", "failed", "cancelled"]);

// ---------------------------------------------------------------- session and login

async function session() {
  const r = await fetch("/api/session", { credentials: "same-origin" });
  const s = await r.json();
  S.loginRequired = s.login_required; S.loggedIn = s.logged_in; S.csrf = s.csrf;
  $("logout").hidden = !S.loggedIn;
  if (S.loginRequired && !S.loggedIn) { showLogin(); return; }
  $("login").hidden = true; $("main").hidden = false;
  connect();
}

function showLogin() {
  if (S.es) { S.es.close(); S.es = null; }
  $("main").hidden = true; $("login").hidden = false; setConn(false, "log in");
}

$("login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("login-error").textContent = "";
  const r = await fetch("/api/login", { method: "POST", credentials: "same-origin",
    headers: { "Content-Type": "application/json" }, body: JSON.stringify({ secret: $("secret").value }) });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) { $("login-error").textContent = body.error || `refused (${r.status})`; return; }
  $("secret").value = "";
  await session();
});

$("logout").addEventListener("click", async () => {
  await fetch("/api/logout", { method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": S.csrf || "" } });
  await session();
});

function setConn(ok, text) {
  const c = $("conn"); c.textContent = text || (ok ? "live" : "reconnecting"); c.className = "pill " + (ok ? "on" : "off");
}

function connect() {
  if (S.es) S.es.close();
  const es = S.es = new EventSource("/api/events");
  es.onopen = () => setConn(true);
  es.onmessage = (ev) => { setConn(true); apply(JSON.parse(ev.data)); };
  es.onerror = async () => {
    setConn(false);
    if (es.readyState === EventSource.CLOSED) {  // refused (e.g. the login expired): ask again
      setTimeout(() => session().catch(() => setConn(false)), 1000);
    }
  };
}

// ---------------------------------------------------------------- the model

function apply(body) {
  S.body = body; S.open = body.open;
  if (body.checkpoints !== undefined) S.checkpoints = body.checkpoints;  // sent only when they change
  if (body.runs !== undefined) S.runs = body.runs;
  if (body.sweeps !== undefined) S.sweeps = body.sweeps;  // the sweeps' live tables, also only when they change
  S.exports = body.exports || [];
  const present = new Set();
  for (const v of body.jobs) {
    present.add(v.job);
    let rec = S.jobs.get(v.job);
    if (!rec || v.reset) { rec = { points: [], log: [] }; S.jobs.set(v.job, rec); }
    rec.snap = v.snap; rec.stale = v.stale; rec.generations = v.generations; rec.detailed = v.detailed;
    for (const p of v.points) rec.points.push(p);
    for (const line of v.log) rec.log.push(line);
    if (rec.log.length > LOG_KEPT) rec.log.splice(0, rec.log.length - LOG_KEPT);
  }
  for (const job of [...S.jobs.keys()]) if (!present.has(job)) S.jobs.delete(job);
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("job");
  if (fromHash && (S.jobs.has(fromHash) || recorded(fromHash))) S.selected = fromHash;  // the user's choice
  else S.selected = body.jobs.length ? body.jobs[0].job : S.runs.length ? S.runs[0].job : null;  // else the newest
  render();
}

// ---------------------------------------------------------------- rendering

function stateCell(state) { return el("td", { class: "s-" + state, "data-state": state }, state || "—"); }

function renderNodes(mesh) {
  const tbody = $("nodes").tBodies[0]; tbody.replaceChildren();
  const why = new Map();  // node -> why its share is what it is ("on battery: halved", "hot: ..."), from running jobs
  for (const rec of S.jobs.values()) if (!FINISHED.has(rec.snap.state)) for (const w of rec.snap.workers || []) if (w.why) why.set(w.node, w.why);
  for (const n of mesh.nodes || []) {
    const name = el("td", {}, n.name || n.id);
    if (mesh.leader && (mesh.leader === n.id || mesh.leader === n.name)) name.append(el("span", { class: "badge" }, "leader"));
    if (mesh.self && mesh.self === n.id) name.append(el("span", { class: "badge" }, "this node"));
    const b = n.battery || null;
    let power = "mains";
    if (b && typeof b === "object") {
      const parts = [];
      if (num(b.percent)) parts.push(fmt.n(b.percent) + "%");
      if (b.plugged === false || b.on_battery === true) parts.push("on battery");
      if (b.thermal) parts.push("thermal " + b.thermal);
      power = parts.join(", ") || "battery";
    }
    if (n.thermal) power += ", thermal " + n.thermal;
    if (why.has(n.name)) power += ` (${why.get(n.name)})`;
    tbody.append(el("tr", { "data-node": n.name },
      name, stateCell(n.state), el("td", {}, n.addr || "—"), el("td", {}, n.device || "—"),
      el("td", {}, n.platform || "—"), el("td", {}, fmt.n(n.cores)), el("td", {}, fmt.gb(n.memory_gb)),
      el("td", {}, num(n.load) ? fmt.pct(n.load) : "—"), el("td", {}, power),
      el("td", {}, n.job ? `${n.job}${n.role ? " (" + n.role + ")" : ""}` : "—")));
  }
  const alive = (mesh.nodes || []).filter((n) => n.state === "alive").length;
  const leader = (mesh.nodes || []).find((n) => n.id === mesh.leader);
  $("mesh-summary").textContent = `${alive} of ${(mesh.nodes || []).length} nodes alive` +
    (leader ? ` · leader ${leader.name}` : "") + (mesh.version ? ` · meshtrain ${mesh.version}` : "");
}

function renderJobs() {
  const tbody = $("jobs").tBodies[0]; tbody.replaceChildren();
  $("no-jobs").hidden = S.jobs.size > 0;
  for (const [job, rec] of S.jobs) {
    const s = rec.snap;
    const state = rec.stale ? `${s.state} (gone)` : s.state;
    const row = el("tr", { class: "clickable" + (job === S.selected ? " selected" : ""), "data-job": job },
      el("td", {}, job), el("td", {}, s.script || "—"), stateCell(state),
      el("td", {}, (s.nodes || (s.workers || []).map((w) => w.node)).join(", ") || "—"),
      el("td", {}, s.epochs ? `${s.epoch || 0}/${s.epochs}` : "—"),
      el("td", {}, s.steps_per_epoch ? `${s.step || 0}/${s.steps_per_epoch}` : fmt.n(s.step)),
      el("td", {}, fmt.loss(s.loss)), el("td", {}, fmt.n(s.samples_per_s)), el("td", {}, fmt.dur(s.elapsed_s)));
    row.addEventListener("click", () => { S.selected = job; location.hash = "job=" + encodeURIComponent(job); render(); });
    tbody.append(row);
  }
}

function eventItem(e) {
  return el("li", {}, el("span", { class: "t" }, fmt.clock(e.t)), el("span", { class: "k" }, e.kind || "?"),
            `${e.node || ""}${e.detail ? " — " + e.detail : ""}`);
}

function chartFor(container, name) {
  const width = Math.max(280, container.clientWidth - 10);
  const byTime = S.xaxis === "time";
  const opts = { width, height: 180, legend: { show: false }, cursor: { drag: { x: false, y: false } },
    scales: { x: { time: byTime } },
    series: [{ label: S.xaxis }, { label: name, stroke: name === "loss" ? "#1a73e8" : "#e37400", width: 2, spanGaps: true }],
    axes: [{ label: byTime ? "time" : "step", size: 36 }, { size: 56 }] };
  return new uPlot(opts, [[], []], container);
}

// ---------------------------------------------------------------- finished jobs (the run store)

function recorded(job) { return S.runs.find((r) => r.job === job) || null; }

function recordedRec(run) {
  // a job only the run store still knows: its record, and the points fetched from /api/runs/JOB
  const f = run.final || {};
  return { recorded: true, detailed: false, stale: false, log: [], generations: [], points: [],
    snap: { job: run.job, script: run.script, state: run.state, message: run.reason, elapsed_s: run.duration_s,
            loss: f.loss, test_accuracy: f.test_accuracy, nodes: run.nodes, workers: [], events: [] } };
}

function jobRec(job) { if (!job) return null; const rec = S.jobs.get(job); if (rec) return rec; const run = recorded(job); return run ? recordedRec(run) : null; }

async function ensureHistory(job) {
  // the run store's points of a job: the whole curve even when this page (or this dashboard) came late
  if (!job || S.history.has(job) || !recorded(job)) return;
  S.history.set(job, { points: [], loaded: false });
  try {
    const r = await fetch(`/api/runs/${encodeURIComponent(job)}`, { credentials: "same-origin" });
    if (r.ok) { const body = await r.json(); S.history.set(job, { points: body.points || [], loaded: true }); }
    else S.history.set(job, { points: [], loaded: true });
  } catch (e) { S.history.delete(job); return; }
  render();
}

function allPoints(rec, job) {
  // the recorded points from before the first live one, then the live ones (their steps moved on if the
  // live count started again below the recorded ones: a dashboard started in a later epoch)
  const hist = (S.history.get(job) || {}).points || [];
  const live = rec.points;
  if (!hist.length) return live;
  if (!live.length) return hist;
  const before = hist.filter((p) => p.t < live[0].t);
  if (!before.length) return live;
  const last = before[before.length - 1].step;
  const shift = live[0].step <= last ? last + 1 - live[0].step : 0;
  return before.concat(shift ? live.map((p) => ({ ...p, step: p.step + shift })) : live);
}

function renderCharts(rec, job) {
  const box = $("charts");
  const key = job + "|" + S.xaxis;
  if (S.chartJob !== key) { for (const c of S.charts.values()) c.plot.destroy(); S.charts.clear(); box.replaceChildren(); S.chartJob = key; }
  const points = allPoints(rec, job);
  const names = [];
  for (const p of points) for (const k of Object.keys(p.m)) if (!names.includes(k)) names.push(k);
  names.sort((a, b) => (a === "loss" ? -1 : b === "loss" ? 1 : a.localeCompare(b)));
  for (const name of names) {
    let c = S.charts.get(name);
    if (!c) {
      const holder = el("div", { class: "chart", "data-metric": name, id: "chart-" + name.replace(/[^\w-]/g, "_") },
                        el("div", { class: "name" }, name));
      box.append(holder);
      c = { holder, plot: chartFor(holder, name), n: -1 };
      S.charts.set(name, c);
    }
    const xs = [], ys = [];
    const byTime = S.xaxis === "time";
    let pairs = [];
    for (const p of points) if (p.m[name] !== undefined) pairs.push([byTime ? p.t : p.step, p.m[name]]);
    if (byTime) pairs = pairs.sort((a, b) => a[0] - b[0]);  // workers' clocks: uPlot wants x in order
    for (const [x, y] of pairs) { xs.push(x); ys.push(y); }
    if (xs.length !== c.n) { c.plot.setData([xs, ys]); c.n = xs.length; c.holder.setAttribute("data-points", String(xs.length)); }
    const last = ys.length ? ys[ys.length - 1] : null;
    c.holder.firstChild.textContent = `${name}: ${name === "loss" ? fmt.loss(last) : fmt.n(last, 4)} (${xs.length} points)`;
  }
}

function renderJob() {
  const rec = jobRec(S.selected);
  $("job").hidden = !rec;
  if (!rec) return;
  ensureHistory(S.selected);
  const s = rec.snap;
  $("job-id").textContent = S.selected;
  const st = $("job-state"); st.textContent = s.state; st.className = "pill s-" + s.state; st.setAttribute("data-state", s.state);
  const bits = [s.script, s.size ? `${s.size} nodes` : null, s.epochs ? `epoch ${s.epoch}/${s.epochs}` : null,
    `loss ${fmt.loss(s.loss)}`, num(s.test_accuracy) ? `accuracy ${fmt.pct(s.test_accuracy)}` : null,
    num(s.samples_per_s) ? `${fmt.n(s.samples_per_s)} samples/s` : null,
    num(s.ring_mb_s) ? `ring ${fmt.n(s.ring_mb_s, 1)} MB/s` : null, num(s.generation) ? `generation ${s.generation}` : null,
    num(s.eta_s) ? `ETA ${fmt.dur(s.eta_s)}` : null, `elapsed ${fmt.dur(s.elapsed_s)}`];
  $("job-summary").textContent = bits.filter(Boolean).join(" · ") + (s.message ? ` — ${s.message}` : "") +
    (rec.stale ? " — no longer reported by this node (its coordinator has the outcome)" : "") +
    (rec.recorded ? " — from this node's run store (meshtrain runs show " + S.selected + ")" : "");
  $("job-recorded").hidden = !rec.recorded;
  $("cancel").hidden = FINISHED.has(s.state) || rec.stale || !rec.detailed;
  renderCharts(rec, S.selected);
  const tbody = $("workers").tBodies[0]; tbody.replaceChildren();
  for (const w of s.workers || []) {
    tbody.append(el("tr", { "data-worker": w.node }, el("td", {}, w.node), el("td", {}, w.rank), el("td", {}, fmt.n(w.step)),
      el("td", {}, fmt.loss(w.loss)), el("td", {}, fmt.n(w.samples_per_s)), el("td", {}, fmt.pct(w.share)),
      el("td", {}, w.why || "")));
  }
  const gens = $("generations"); gens.replaceChildren();
  for (const g of rec.generations || []) gens.append(el("li", { "data-generation": g.generation }, `generation ${g.generation} at step ${g.step} (${fmt.clock(g.t)})`));
  const evs = $("job-events"); evs.replaceChildren();
  for (const e of (s.events || []).slice().reverse()) evs.append(eventItem(e));
  const out = $("output"); const stick = out.scrollTop + out.clientHeight >= out.scrollHeight - 4;
  out.textContent = rec.log.join("\n");
  if (stick) out.scrollTop = out.scrollHeight;
}

function changed(name, ...parts) {
  // whether what a table shows moved since it was last drawn (redrawn rows would eat a click half-way)
  const sig = JSON.stringify(parts);
  if (S.drawn && S.drawn[name] === sig) return false;
  S.drawn = S.drawn || {}; S.drawn[name] = sig; return true;
}

function renderCheckpoints(runs) {
  if (!changed("checkpoints", runs, S.exports)) return;
  const tbody = $("checkpoints").tBodies[0]; tbody.replaceChildren();
  let n = 0;
  const exports = new Map(S.exports.map((e) => [e.id, e]));
  for (const run of runs || []) for (const c of run.checkpoints || []) {
    n++;
    const id = `${run.run}@${c.step}`;
    const m = Object.entries(c.metrics || {}).map(([k, v]) => `${k} ${fmt.loss(v)}`).join(", ");
    const e = exports.get(id);
    const button = el("button", { "data-export": id, title: "write the model parameters as one safetensors file" },
                      e && e.state === "running" ? "exporting…" : e && e.state === "done" ? "exported" : "export");
    button.disabled = !!e && e.state !== "failed";
    button.addEventListener("click", () => startExport(run.run, c.step));
    tbody.append(el("tr", { "data-checkpoint": id }, el("td", {}, run.run), el("td", {}, c.step), el("td", {}, fmt.clock(c.time)),
      el("td", {}, m || "—"), el("td", {}, fmt.bytes(c.bytes)), el("td", {}, (c.replicas || []).join(", ") || "this node"),
      el("td", {}, button)));
  }
  $("no-checkpoints").hidden = n > 0;
  const list = $("exports"); list.replaceChildren();
  for (const e of S.exports) {
    const what = e.state === "done"
      ? el("a", { href: e.url, download: e.file, "data-download": e.id }, `download ${e.file}`)
      : e.state === "failed" ? el("span", { class: "error" }, `failed: ${e.error}`) : el("span", { class: "muted" }, "exporting…");
    list.append(el("li", { "data-export-state": e.state, "data-export-id": e.id },
      el("span", { class: "k" }, e.id), what,
      e.state === "done" ? el("span", { class: "muted" }, ` ${fmt.bytes(e.bytes)} in ${fmt.n(e.took_s, 1)} s`) : null));
  }
}

async function startExport(run, step) {
  const r = await fetch(`/api/checkpoints/${encodeURIComponent(run)}/${step}/export`, { method: "POST",
    credentials: "same-origin", headers: { "X-CSRF-Token": S.csrf || "" } });
  const body = await r.json().catch(() => ({}));
  $("export-msg").textContent = r.ok ? "" : `refused: ${body.error || r.status}`;
  if (r.status === 401) showLogin();
}

function renderHistory() {
  if (!changed("history", S.runs, S.selected)) return;
  const tbody = $("history").tBodies[0]; tbody.replaceChildren();
  $("no-history").hidden = S.runs.length > 0;
  for (const run of S.runs) {
    const f = run.final || {};
    const finals = Object.entries(f).filter(([k]) => k !== "loss").slice(0, 3).map(([k, v]) => `${k} ${fmt.loss(v)}`).join(", ");
    const row = el("tr", { class: "clickable" + (run.job === S.selected ? " selected" : ""), "data-run": run.job },
      el("td", {}, run.job), el("td", {}, run.name || "—"), stateCell(run.state), el("td", {}, (run.nodes || []).join(", ") || "—"),
      el("td", {}, fmt.loss(f.loss)), el("td", {}, finals || "—"), el("td", {}, fmt.dur(run.duration_s)),
      el("td", {}, fmt.when(run.ended || run.started)));
    row.addEventListener("click", () => { S.selected = run.job; location.hash = "job=" + encodeURIComponent(run.job); render(); });
    tbody.append(row);
  }
}

// ---------------------------------------------------------------- sweeps ($MESHTRAIN_HOME/sweeps/NAME.json)

function paramCell(v) { return num(v) ? (Number.isInteger(v) ? String(v) : v.toPrecision(4)) : v === null || v === undefined ? "—" : String(v); }

function renderSweeps() {
  if (!changed("sweeps", S.sweeps, S.selected, S.runs.length)) return;
  const box = $("sweeps"); box.replaceChildren();
  $("no-sweeps").hidden = S.sweeps.length > 0;
  for (const sw of S.sweeps) {
    const trials = sw.trials || [];
    const spec = sw.spec || {};
    const keys = (spec.params || []).map((p) => String(p).split("=")[0]).filter(Boolean);  // the --param order
    for (const t of trials) for (const k of Object.keys(t.params || {})) if (!keys.includes(k)) keys.push(k);
    const metric = sw.metric || "objective";
    const best = trials.find((t) => t.trial === sw.best) || null;
    const counts = {};
    for (const t of trials) counts[t.state] = (counts[t.state] || 0) + 1;
    const head = el("h3", {}, `sweep ${sw.name}`, el("span", { class: "pill s-" + sw.state, "data-state": sw.state }, sw.state || "—"),
      el("span", { class: "muted" }, [spec.script, `${sw.direction || ""} ${metric}`.trim(),
        `${trials.length}${num(spec.trials) ? " of " + spec.trials : ""} trials`,
        Object.entries(counts).map(([k, v]) => `${v} ${k}`).join(", "),
        best ? `best: trial ${best.trial} (${metric} ${fmt.loss(best.value)})` : null,
        `updated ${fmt.clock(sw.updated)}`].filter(Boolean).join(" · ")));
    const cols = ["trial", ...keys, "state", metric, "node", "run"];
    const table = el("table", { "data-sweep": sw.name }, el("thead", {}, el("tr", {},
      ...cols.map((c, i) => el("th", { class: (i > 0 && i <= keys.length) || c === metric ? "num" : null }, c)))));
    const tbody = el("tbody");
    for (const t of trials) {
      const isBest = best !== null && t.trial === best.trial;
      const opens = t.run && (S.jobs.has(t.run) || recorded(t.run));
      const why = t.message && t.state !== "complete" ? `${t.state}: ${t.message}` : t.state;
      const row = el("tr", { class: [isBest ? "best" : "", opens ? "clickable" : "", t.run && t.run === S.selected ? "selected" : ""].join(" ").trim(),
                             "data-trial": t.trial, "data-best": isBest ? "1" : null, title: isBest ? "the best trial" : null },
        el("td", {}, t.trial), ...keys.map((k) => el("td", { class: "num" }, paramCell((t.params || {})[k]))),
        el("td", { class: "s-" + t.state, "data-state": t.state, title: why }, t.state + (t.retries ? ` (retried ${t.retries}×)` : "")),
        el("td", { class: "num" }, fmt.loss(t.value)), el("td", {}, (t.nodes || []).join(", ") || "—"), el("td", {}, t.run || "—"));
      if (opens) row.addEventListener("click", () => { S.selected = t.run; location.hash = "job=" + encodeURIComponent(t.run); render(); });
      tbody.append(row);
    }
    table.append(tbody);
    box.append(el("div", { class: "sweep", "data-sweep": sw.name }, head, table));
  }
}

function render() {
  const b = S.body; if (!b) return;
  $("banner").hidden = !b.agent_error; $("banner").textContent = b.agent_error ? `agent unreachable: ${b.agent_error}` : "";
  renderNodes(b.mesh || {});
  renderJobs();
  renderJob();
  const mev = $("mesh-events"); mev.replaceChildren();
  for (const e of ((b.mesh || {}).events || []).slice().reverse()) mev.append(eventItem(e));
  renderHistory();
  renderSweeps();
  renderCheckpoints(S.checkpoints);
  const drops = Object.entries((b.mesh || {}).drops || {}).filter(([, v]) => v).map(([k, v]) => `${k} ${v}`);
  const logins = b.logins || {};
  if (logins.refused || logins.rate_limited) drops.push(`refused dashboard logins ${logins.refused}, rate-limited ${logins.rate_limited}`);
  $("drops").textContent = drops.length ? "refused by this node: " + drops.join(", ") : "";
}

$("cancel").addEventListener("click", async () => {
  const job = S.selected; if (!job) return;
  if (!confirm(`Cancel job ${job} on every node?`)) return;
  const r = await fetch(`/api/jobs/${encodeURIComponent(job)}/cancel`, { method: "POST", credentials: "same-origin",
    headers: { "X-CSRF-Token": S.csrf || "" } });
  const body = await r.json().catch(() => ({}));
  $("job-msg").textContent = r.ok ? (body.message || "cancelling") : `refused: ${body.error || r.status}`;
  if (r.status === 401) showLogin();
});

window.addEventListener("resize", () => { for (const c of S.charts.values()) c.plot.setSize({ width: Math.max(280, c.holder.clientWidth - 10), height: 180 }); });
window.addEventListener("hashchange", () => { const j = new URLSearchParams(location.hash.slice(1)).get("job"); if (j && (S.jobs.has(j) || recorded(j))) { S.selected = j; render(); } });
$("xaxis").addEventListener("change", (ev) => { S.xaxis = ev.target.value === "time" ? "time" : "step"; render(); });
session().catch((e) => { setConn(false, "cannot reach the dashboard"); console.error(e); });
