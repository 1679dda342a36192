// The lossguard dashboard: #/ runs, #/run/<id> one run's charts and alerts, #/alerts feed and silences.
// Data from /lossguard/api/*, polled every few seconds; pages update in place (no reload).
"use strict";

const API = "/lossguard/api";
const POLL_MS = 2000;
const SEVERITIES = ["critical", "high", "medium", "low"];
const main = document.getElementById("main");
let timer = null;
let page = null;

const esc = s => String(s ?? "").replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const age = s => s == null ? "-" : s < 60 ? `${Math.round(s)}s ago` : s < 3600 ? `${Math.round(s / 60)}m ago`
  : s < 86400 ? `${Math.round(s / 3600)}h ago` : `${Math.round(s / 86400)}d ago`;
const when = ts => ts == null ? "-" : new Date(ts * 1000).toLocaleString();
const rank = sev => SEVERITIES.length - 1 - SEVERITIES.indexOf(sev);
const globRe = g => new RegExp("^" + g.replace(/[.+^${}()|[\]\\]/g, "\\$&").replace(/\*/g, ".*").replace(/\?/g, ".") + "$");

async function getJSON(url) {
  const r = await fetch(url);
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
  return r.json();
}
async function postJSON(url, body) {
  const r = await fetch(url, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body || {})});
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(data.error || `HTTP ${r.status}`);
  return data;
}
function stamp() { document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString(); }

// -- runs page -------------------------------------------------------------------------------------------
const runsState = {sort: "health", asc: false, sparks: new Map()};
const RUN_COLUMNS = [["health", "health"], ["run_id", "run"], ["status", "status"], ["last_step", "last step"],
  ["age_s", "last seen"], [null, "loss"], ["open", "open alerts"], [null, "latest alert"]];

function runsPage() {
  main.innerHTML = `<h1>Runs</h1><div class="filters">
    <label>run <input id="f-run" placeholder="glob, e.g. exp-*"></label>
    <label>tag <input id="f-tag" placeholder="key=value"></label>
    <label>open alerts at least <select id="f-sev"><option value="">any</option>${SEVERITIES.map(s => `<option>${s}</option>`).join("")}</select></label>
    </div><table id="runs"><thead><tr>${RUN_COLUMNS.map(([k, l]) => `<th data-key="${k ?? ""}">${l}</th>`).join("")}</tr></thead><tbody></tbody></table>
    <p id="runs-empty" class="muted"></p>`;
  runsState.sparks = new Map();
  for (const th of main.querySelectorAll("th[data-key]")) {
    if (!th.dataset.key) continue;
    th.onclick = () => { runsState.asc = runsState.sort === th.dataset.key ? !runsState.asc : false; runsState.sort = th.dataset.key; refreshRuns(); };
  }
  for (const id of ["f-run", "f-tag", "f-sev"]) document.getElementById(id).oninput = () => refreshRuns();
  return refreshRuns;
}

function runSortKey(r, key) {
  if (key === "health") return r.health === "ok" ? -1 : rank(r.health) * 1e6 + Object.values(r.open_alerts).reduce((a, b) => a + b, 0);
  if (key === "open") return SEVERITIES.reduce((acc, s) => acc * 1000 + r.open_alerts[s], 0);
  if (key === "age_s") return -(r.age_s ?? 1e12);
  return r[key] ?? "";
}

let lastRuns = [];
async function refreshRuns(fetchNew = false) {
  if (fetchNew || !lastRuns.length) lastRuns = await getJSON(`${API}/runs`);
  const fRun = document.getElementById("f-run").value.trim(), fTag = document.getElementById("f-tag").value.trim();
  const fSev = document.getElementById("f-sev").value;
  const rows = lastRuns.filter(r => (!fRun || globRe(fRun).test(r.run_id))
    && (!fTag || Object.entries(r.tags || {}).some(([k, v]) => `${k}=${v}` === fTag || k === fTag))
    && (!fSev || SEVERITIES.slice(0, SEVERITIES.indexOf(fSev) + 1).some(s => r.open_alerts[s] > 0)));
  const {sort, asc} = runsState;
  rows.sort((a, b) => { const x = runSortKey(a, sort), y = runSortKey(b, sort); return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1); });
  for (const th of main.querySelectorAll("th")) th.className = th.dataset.key === sort ? (asc ? "sorted asc" : "sorted") : "";
  const tbody = main.querySelector("#runs tbody");
  const seen = new Set();
  for (const r of rows) {
    seen.add(r.run_id);
    let tr = tbody.querySelector(`tr[data-run="${CSS.escape(r.run_id)}"]`);
    if (!tr) {
      tr = document.createElement("tr");
      tr.dataset.run = r.run_id;
      tr.innerHTML = `<td class="c-health"></td><td><a href="#/run/${encodeURIComponent(r.run_id)}">${esc(r.run_id)}</a></td>
        <td class="c-status"></td><td class="c-step"></td><td class="c-age"></td><td><div class="spark"></div></td>
        <td class="c-open counts"></td><td class="c-latest msg"></td>`;
    }
    tbody.appendChild(tr);  // keeps the sorted order
    tr.className = r.health === "critical" || r.health === "high" ? `sick-${r.health}` : "";
    tr.dataset.health = r.health;
    tr.querySelector(".c-health").innerHTML = `<span class="dot h-${r.health}"></span>${r.health}`;
    tr.querySelector(".c-status").innerHTML = `<span class="badge ${r.status}">${r.status}</span>`;
    tr.querySelector(".c-step").textContent = r.last_step ?? "-";
    tr.querySelector(".c-age").textContent = age(r.age_s);
    tr.querySelector(".c-open").innerHTML = SEVERITIES.filter(s => r.open_alerts[s]).map(s => `<span class="sev sev-${s}">${r.open_alerts[s]} ${s}</span>`).join("") || "none";
    const la = r.latest_alert;
    tr.querySelector(".c-latest").innerHTML = la ? `<span class="sev sev-${la.severity}">${la.severity}</span> ${esc(la.alert_type)}: ${esc(la.message)}` : "";
    tr.querySelector(".c-latest").title = la ? la.message : "";
    drawSpark(tr.querySelector(".spark"), r);
  }
  for (const tr of [...tbody.querySelectorAll("tr")]) if (!seen.has(tr.dataset.run)) tr.remove();
  document.getElementById("runs-empty").textContent = lastRuns.length ? "" : "No runs yet: start a training run with a lossguard reporter.";
  stamp();
}

function drawSpark(el, r) {
  const xs = r.sparkline.map(p => p[0]), ys = r.sparkline.map(p => p[1]);
  let plot = runsState.sparks.get(r.run_id);
  if (plot && plot.root.parentNode !== el) { plot.destroy(); plot = null; }
  if (!plot) {
    plot = new uPlot({width: 140, height: 34, cursor: {show: false}, legend: {show: false}, select: {show: false},
      scales: {x: {time: false}}, axes: [{show: false}, {show: false}],
      series: [{}, {stroke: LG_SEVERITY_COLOURS[r.health] || "#43a047", width: 1.2, points: {show: false}}]}, [xs, ys], el);
    runsState.sparks.set(r.run_id, plot);
  } else {
    plot.setData([xs, ys]);
  }
}

// -- run page ---------------------------------------------------------------------------------------------
function runPage(runId) {
  main.innerHTML = `<p><a href="#/">← runs</a></p><h1>${esc(runId)}</h1><div id="run-meta" class="meta"></div>
    <div id="charts"></div><h2>Alert timeline</h2><table id="timeline"><thead><tr><th>severity</th><th>type</th>
    <th>from step</th><th>to step</th><th>alerts</th><th>first fired</th><th>message</th></tr></thead><tbody></tbody></table>`;
  let drawnAt = null;
  return async () => {
    let run;
    try { run = await getJSON(`${API}/runs/${encodeURIComponent(runId)}`); }
    catch (e) { document.getElementById("run-meta").textContent = `unknown run ${runId} (not in the run table yet)`; return; }
    const tags = Object.entries(run.tags || {}).map(([k, v]) => `${esc(k)}=${esc(v)}`).join(", ") || "none";
    document.getElementById("run-meta").innerHTML = `<span class="badge ${run.status}">${run.status}</span>
      <span>source <b>${esc(run.source || "-")}</b></span><span>tags ${tags}</span><span>last step <b>${run.last_step ?? "-"}</b>
      (${age(run.last_ts == null ? null : Date.now() / 1000 - run.last_ts)})</span><span>${run.events} events</span>
      <span>started ${when(run.first_ts)}</span>
      ${run.status === "stopped" ? `<span class="sev sev-critical">stop requested: ${esc(run.stop_request.reason)}</span>`
        : `<button class="danger" id="stop">Stop run…</button>`}`;
    const stop = document.getElementById("stop");
    if (stop) stop.onclick = async () => {
      const reason = prompt(`Stop run ${runId}? The job's reporter stops training at its next step.\nReason:`, "stopped from the dashboard");
      if (reason === null) return;
      try { await postJSON(`${API}/runs/${encodeURIComponent(runId)}/stop`, {reason}); stop.disabled = true; stop.textContent = "stop requested"; }
      catch (e) { alert(`Could not stop ${runId}: ${e.message}`); }
    };
    const key = `${run.last_step}/${run.alerts.length}`;
    if (key !== drawnAt) {
      for (const p of (runPage.plots || [])) p.destroy();
      runPage.plots = lgDrawCharts(document.getElementById("charts"), run.history, run.episodes, run.last_step);
      drawnAt = key;
    }
    document.querySelector("#timeline tbody").innerHTML = run.episodes.map(e => `<tr><td class="sev sev-${e.severity}">${e.severity}</td>
      <td>${esc(e.alert_type)}</td><td>${e.start}</td><td>${e.open ? "open" : e.end}</td><td>${e.alerts.length}</td>
      <td>${when(e.first_ts)}</td><td>${esc(e.message)}</td></tr>`).join("") || `<tr><td colspan="7" class="muted">no alerts</td></tr>`;
    stamp();
  };
}

// -- alerts page ------------------------------------------------------------------------------------------
function alertsPage() {
  main.innerHTML = `<h1>Alerts</h1><div class="filters">
    <label>run <input id="a-run" placeholder="glob"></label>
    <label>severity at least <select id="a-sev"><option value="">any</option>${SEVERITIES.map(s => `<option>${s}</option>`).join("")}</select></label>
    <label>status <select id="a-status"><option value="">any</option><option>firing</option><option>resolved</option></select></label></div>
    <table id="feed"><thead><tr><th>time</th><th>run</th><th>step</th><th>severity</th><th>status</th><th>type</th><th>message</th></tr></thead><tbody></tbody></table>
    <h2>Silences</h2><form id="silence-form" class="filters">
    <input name="run" placeholder="run glob"><input name="type" placeholder="alert type glob">
    <select name="severity"><option value="">severity (any)</option>${SEVERITIES.map(s => `<option>${s}</option>`).join("")}</select>
    <input name="for" value="1h" size="5"><input name="comment" placeholder="why"><button>Add silence</button><span id="silence-msg"></span></form>
    <table id="silences"><thead><tr><th>id</th><th>run</th><th>type</th><th>severity ≤</th><th>expires</th><th>comment</th><th></th></tr></thead><tbody></tbody></table>`;
  const refresh = async () => {
    const q = new URLSearchParams({run: document.getElementById("a-run").value.trim(), severity: document.getElementById("a-sev").value,
      status: document.getElementById("a-status").value});
    const [feed, silences] = await Promise.all([getJSON(`${API}/alerts?${q}`), getJSON(`${API}/silences`)]);
    document.querySelector("#feed tbody").innerHTML = feed.map(a => `<tr><td>${when(a.ts)}</td>
      <td><a href="#/run/${encodeURIComponent(a.run_id)}">${esc(a.run_id)}</a></td><td>${a.step}</td>
      <td class="sev sev-${a.severity}">${a.severity}</td><td>${a.status}</td><td>${esc(a.alert_type)}</td><td>${esc(a.message)}</td></tr>`).join("")
      || `<tr><td colspan="7" class="muted">no alerts</td></tr>`;
    document.querySelector("#silences tbody").innerHTML = silences.map(s => `<tr><td>${esc(s.id)}</td><td>${esc(s.run_id)}</td>
      <td>${esc(s.alert_type)}</td><td>${esc(s.severity)}</td><td>${s.active ? when(s.expires_at) : "expired"}</td><td>${esc(s.comment)}</td>
      <td>${s.active ? `<button data-expire="${esc(s.id)}">Expire</button>` : ""}</td></tr>`).join("")
      || `<tr><td colspan="7" class="muted">no silences</td></tr>`;
    for (const b of main.querySelectorAll("button[data-expire]")) b.onclick = async () => {
      await postJSON(`${API}/silences/${encodeURIComponent(b.dataset.expire)}/expire`); b.disabled = true; refresh();
    };
    stamp();
  };
  for (const id of ["a-run", "a-sev", "a-status"]) document.getElementById(id).oninput = () => refresh();
  document.getElementById("silence-form").onsubmit = async ev => {
    ev.preventDefault();
    const body = Object.fromEntries(new FormData(ev.target));
    try { const r = await postJSON(`${API}/silences`, body); document.getElementById("silence-msg").textContent = `added ${r.id}`; refresh(); }
    catch (e) { document.getElementById("silence-msg").textContent = e.message; }
  };
  return refresh;
}

// -- router -----------------------------------------------------------------------------------------------
function route() {
  clearInterval(timer);
  const hash = location.hash || "#/";
  let refresh;
  if (hash.startsWith("#/run/")) { page = "run"; refresh = runPage(decodeURIComponent(hash.slice(6))); }
  else if (hash.startsWith("#/alerts")) { page = "alerts"; refresh = alertsPage(); }
  else { page = "runs"; lastRuns = []; const draw = runsPage(); refresh = () => draw(true); }
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.page === page);
  const tick = () => refresh().catch(e => { document.getElementById("updated").textContent = `update failed: ${e.message}`; });
  tick();
  timer = setInterval(tick, POLL_MS);
}
window.addEventListener("hashchange", route);
route();
