// gridvm web console: one page, no framework. Data arrives as server-sent events (one per
// section: hosts, domains, tasks, networks, services, images); actions start tasks.
"use strict";

const S = { me: null, hosts: null, domains: [], tasks: [], networks: [], services: [],
            images: [] };
let events = null;          // the EventSource
let route = [];             // e.g. ["domain", "web1"]
let detail = null;          // the open domain detail: {name, charts, stream, term, ws}
const mine = new Set();     // tasks this page started: their failure is shown when it comes

const $ = (sel, root = document) => root.querySelector(sel);
const esc = (v) => String(v ?? "").replace(/[&<>"']/g,
  (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
const admin = () => S.me && S.me.role === "admin";
const badge = (s) => `<span class="badge ${esc(s)}">${esc(s)}</span>`;
const mib = (n) => (n == null ? "-" : `${n} MiB`);
const secs = (s) => {
  if (s == null) return "-";
  s = Math.floor(s);
  const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
  return (d ? `${d}d ` : "") + `${h}:${String(m).padStart(2, "0")}:${String(s % 60).padStart(2, "0")}`;
};
const rate = (b) => b < 1024 ? `${b.toFixed(0)} B/s` : b < 1048576 ? `${(b / 1024).toFixed(1)} KiB/s`
  : `${(b / 1048576).toFixed(1)} MiB/s`;

// ----- talking to gridvmd -------------------------------------------------------------------

async function api(method, path, body) {
  const opts = { method, headers: {}, credentials: "same-origin" };
  if (body !== undefined) {
    opts.headers["content-type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const resp = await fetch(`api/${path}`, opts);
  const data = await resp.json().catch(() => ({}));
  if (resp.status === 401) { showLogin(data.error || data.detail); throw new Error("not logged in"); }
  if (!resp.ok) {
    const msg = data.error || (typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail));
    throw new Error(msg || `HTTP ${resp.status}`);
  }
  return data;
}

function toast(message, kind = "error") {
  const t = $("#toast");
  t.textContent = message;
  t.className = kind;
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, 8000);
}

// Start a task; show its error at once if gridvmd refused it.
async function act(action, target, params = {}) {
  try {
    const task = await api("POST", "tasks", { action, target, params });
    toast(`${action} ${target}: task ${task.id} started`, "info");
    mine.add(task.id);
    return task;
  } catch (e) {
    if (e.message !== "not logged in") toast(`${action} ${target}: ${e.message}`);
    return null;
  }
}

// ----- login --------------------------------------------------------------------------------

function showLogin(message) {
  if (events) { events.close(); events = null; }
  closeDetail();
  $("#app").hidden = true;
  $("#login").hidden = false;
  $("#login-error").textContent = message || "";
}

$("#login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const resp = await fetch("api/login", { method: "POST", headers: { "content-type": "application/json" },
                                          body: JSON.stringify({ token: $("#login-token").value }) });
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) { $("#login-error").textContent = data.detail || data.error || "login failed"; return; }
  $("#login-token").value = "";
  start();
});

$("#logout").addEventListener("click", async () => {
  await fetch("api/logout", { method: "POST" });
  showLogin("logged out");
});

async function start() {
  let me;
  try { me = await api("GET", "whoami"); } catch (e) { return; }
  S.me = me;
  $("#login").hidden = true;
  $("#app").hidden = false;
  $("#me").innerHTML = `token ${esc(me.id)} ${badge(me.role)}`;
  connect();
  onRoute();
}

function connect() {
  events = new EventSource("api/events");
  for (const name of ["hosts", "domains", "tasks", "networks", "services", "images"]) {
    events.addEventListener(name, (e) => { S[name] = JSON.parse(e.data); changed(name); });
  }
  events.addEventListener("auth", (e) => showLogin(JSON.parse(e.data).error));
  events.onerror = async () => {
    const resp = await fetch("api/whoami").catch(() => null);
    if (resp && resp.status === 401) { const b = await resp.json(); showLogin(b.error || b.detail); }
  };
}

// ----- routing and rendering ----------------------------------------------------------------

window.addEventListener("hashchange", onRoute);

function onRoute() {
  route = (location.hash.replace(/^#\/?/, "") || "overview").split("/").map(decodeURIComponent);
  document.querySelectorAll("nav a").forEach((a) =>
    a.classList.toggle("active", a.dataset.view === route[0] || (route[0] === "domain" && a.dataset.view === "domains")));
  if (route[0] !== "domain" && route[0] !== "console") closeDetail();
  if (route[0] === "domain" || route[0] === "console") openDetail(route[1], route[0] === "console");
  else render();
}

function changed(section) {
  if (section === "tasks") renderTaskLog();
  if (route[0] === "domain" || route[0] === "console") updateDetail();
  else if (section === route[0] || (route[0] === "overview" && ["hosts", "domains"].includes(section))
           || (route[0] === "domains" && ["domains", "tasks"].includes(section))) render();
}

const VIEWS = { overview: viewOverview, domains: viewDomains, networks: viewNetworks,
                services: viewServices, images: viewImages, tasks: viewTasks };

function render() {
  const fn = VIEWS[route[0]] || viewOverview;
  $("#view").innerHTML = fn();
}

function runningTask(action, target) {
  return S.tasks.find((t) => t.state === "running" && t.action === action && t.target === target);
}

function viewOverview() {
  if (!S.hosts) return `<p class="muted">loading…</p>`;
  const { info, cluster, hosts } = S.hosts;
  $("#cluster-name").textContent = cluster.joined ? `cluster ${cluster.cluster?.name || ""} · host ${cluster.host}` : info.home;
  const running = S.domains.filter((d) => d.domid != null).length;
  const cards = hosts.map((h) => {
    const used = h.used_mb ?? 0, cap = h.memory_mb || 1;
    const canAct = admin() && cluster.joined;
    return `<div class="card" data-host="${esc(h.name)}">
      <h3>${esc(h.name)} ${badge(h.state)} ${h.leader ? '<span class="badge" title="HA manager">HA manager</span>' : ""}</h3>
      <div>memory ${used} / ${h.memory_mb ?? "-"} MiB</div><div class="bar"><div style="width:${Math.min(100, 100 * used / cap)}%"></div></div>
      <div>CPUs ${esc(h.cpus ?? "-")} · load ${esc(h.load ?? "-")} · ${S.domains.filter((d) => d.host === h.name).length} domain(s)</div>
      <div class="toolbar">
        <button class="small secondary" data-act="maintenance" ${canAct ? "" : "disabled"}
          onclick="act('host.maintenance', '${esc(h.name)}', {on: ${h.state !== "maintenance"}})">
          Maintenance ${h.state === "maintenance" ? "off" : "on"}</button>
        <button class="small secondary" data-act="evacuate" ${canAct && ["up", "maintenance"].includes(h.state) ? "" : "disabled"}
          onclick="confirmAct('Evacuate ${esc(h.name)}? Every running domain is live-migrated away.', 'host.evacuate', '${esc(h.name)}')">Evacuate</button>
      </div></div>`;
  }).join("");
  return `<h2>Overview</h2>
    <p>${hosts.length} host(s) · ${S.domains.length} domain(s), ${running} running · accelerator ${esc(info.accel)}
       ${cluster.joined ? `· HA manager ${esc(cluster.leader || "none")}` : "· no cluster"}</p>
    <div class="cards">${cards}</div>`;
}

function viewDomains() {
  const rows = S.domains.map((d) => {
    const mig = runningTask("domain.migrate", d.name);
    const progress = mig ? ` <progress max="100" value="${mig.progress?.percent || 0}"></progress>` : "";
    return `<tr class="clickable" data-domain="${esc(d.name)}" onclick="location.hash='#/domain/${encodeURIComponent(d.name)}'">
      <td class="name">${esc(d.name)}</td><td class="state">${badge(d.state)}${progress}</td>
      <td class="host">${esc(d.host || "localhost")}</td><td>${esc(d.domid ?? "-")}</td>
      <td>${esc(d.vcpus)}</td><td>${mib(d.memory)}</td><td>${d.cpu_percent != null ? d.cpu_percent.toFixed(1) + "%" : "-"}</td>
      <td>${esc((d.ips || []).join(", "))}</td><td>${secs(d.uptime)}</td>
      <td>${esc(d.ha?.ha && d.ha.ha !== "off" ? `${d.ha.ha} (prio ${d.ha.ha_priority}${d.ha.ha_group ? ", " + d.ha.ha_group : ""})` : "-")}</td></tr>`;
  }).join("");
  return `<h2>Domains</h2>
    <div class="toolbar"><button id="create" ${admin() ? "" : "disabled"} onclick="createDialog()">Create…</button></div>
    <table class="grid" id="domains"><thead><tr><th>Name</th><th>State</th><th>Host</th><th>ID</th><th>vCPUs</th>
    <th>Memory</th><th>CPU</th><th>IPs</th><th>Uptime</th><th>HA</th></tr></thead><tbody>${rows}</tbody></table>`;
}

function viewNetworks() {
  const rows = S.networks.map((n) => `<tr><td>${esc(n.name)}</td><td>${esc(n.mode)}</td><td>${esc(n.bridge)}</td>
    <td>${esc(n.mode === "nat" ? n.subnet : n.uplink || "-")}</td><td>${esc((n.addresses || [n.gateway]).filter(Boolean).join(", "))}</td>
    <td>${esc((n.domains || []).join(", "))}</td><td>${esc((n.forwards || []).map((f) => `${f.host_port}/${f.proto}→${f.domain}:${f.port}`).join(", "))}</td></tr>`).join("");
  return `<h2>Networks <span class="muted">(this host)</span></h2><table class="grid"><thead><tr><th>Name</th><th>Mode</th><th>Bridge</th>
    <th>Subnet / uplink</th><th>Addresses</th><th>Domains</th><th>Forwards</th></tr></thead><tbody>${rows}</tbody></table>`;
}

function viewServices() {
  const blocks = S.services.map((v) => {
    const owner = v.vip_interface ? `held here on ${v.vip_interface}` : v.vip_owner ? `held by ${v.vip_owner}` : "-";
    const rows = v.backends.map((b) => `<tr data-backend="${esc(b.domain)}"><td>${esc(b.domain)}</td><td>${esc(b.ip || "?")}:${esc(b.port)}</td>
      <td class="weight">${esc(b.weight)}</td><td>${badge(b.state)}</td><td>${esc(b.active)}</td><td>${esc(b.inactive)}</td>
      <td>${esc(b.last_check)} (${b.checks - b.failed}/${b.checks})</td>
      <td><button class="small secondary" ${admin() ? "" : "disabled"} data-act="drain" onclick="act('service.drain', '${esc(v.name)}', {domain: '${esc(b.domain)}', undo: ${!!b.drained}})">${b.drained ? "Undrain" : "Drain"}</button>
          <button class="small secondary" ${admin() ? "" : "disabled"} data-act="weight" onclick="weightDialog('${esc(v.name)}', '${esc(b.domain)}', ${b.weight})">Weight…</button></td></tr>`).join("");
    return `<div class="card" data-service="${esc(v.name)}"><h3>${esc(v.name)} <span class="muted">${esc(v.address)} · ${esc(v.scheduler)} · VIP ${esc(owner)}</span></h3>
      <table class="grid"><thead><tr><th>Backend</th><th>Address</th><th>Weight</th><th>Health</th><th>Active</th><th>Inactive</th><th>Last check</th><th></th></tr></thead>
      <tbody>${rows}</tbody></table></div>`;
  }).join("");
  return `<h2>Virtual services</h2>${blocks || '<p class="muted">no virtual services</p>'}`;
}

function viewImages() {
  const rows = S.images.map((i) => `<tr><td>${esc(i.name)}</td><td>${esc(i.kernel_version)}</td><td>${i.hvm ? "PV + HVM disk" : "PV"}</td>
    <td>${esc(i.kernel)}</td><td>${esc(i.disk || "-")}</td></tr>`).join("");
  return `<h2>Images</h2><table class="grid"><thead><tr><th>Name</th><th>Kernel</th><th>Boots</th><th>Kernel file</th><th>Disk</th></tr></thead>
    <tbody>${rows}</tbody></table>`;
}

function taskRow(t) {
  const p = t.state === "running" && t.progress ? ` ${t.progress.percent.toFixed(0)}%` : "";
  return `<tr data-task="${esc(t.id)}" onclick="taskDialog('${esc(t.id)}')"><td>${new Date(t.started * 1000).toLocaleTimeString()}</td>
    <td>${esc(t.action)}</td><td>${esc(t.target)}</td><td>${badge(t.state)}${p}</td><td class="muted">${esc(t.error || "")}</td><td class="muted">${esc(t.user)}</td></tr>`;
}

function viewTasks() {
  return `<h2>Tasks</h2><table class="grid" id="tasks"><thead><tr><th>Started</th><th>Action</th><th>Target</th><th>Status</th><th>Error</th><th>By</th></tr></thead>
    <tbody>${S.tasks.map(taskRow).join("")}</tbody></table>`;
}

function renderTaskLog() {
  for (const t of S.tasks) {
    if (!mine.has(t.id) || t.state === "running") continue;
    mine.delete(t.id);
    if (t.state === "failed") toast(`${t.action} ${t.target} failed: ${t.error}`);
  }
  $("#tasklog-rows").innerHTML = S.tasks.slice(0, 6).map(taskRow).join("");
  if (taskDialog.open) taskDialog.refresh();
}

// ----- dialogs ------------------------------------------------------------------------------

function dialog(html, onSubmit) {
  const d = $("#dialog"), f = $("#dialog-form");
  f.innerHTML = html;
  f.onsubmit = async (ev) => {
    if (ev.submitter && ev.submitter.value === "cancel") return;
    ev.preventDefault();
    if (await onSubmit(new FormData(f))) d.close();
  };
  d.onclose = () => { taskDialog.open = null; };
  d.showModal();
}
const buttons = (ok) => `<div class="buttons"><button value="cancel" class="secondary" formnovalidate>Close</button>${ok ? `<button value="ok">${ok}</button>` : ""}</div>`;

function confirmAct(text, action, target, params) {
  dialog(`<p>${esc(text)}</p>${buttons("Yes")}`, async () => (await act(action, target, params || {}), true));
}

function createDialog() {
  const hosts = S.hosts?.cluster?.joined ? S.hosts.hosts.map((h) => `<option>${esc(h.name)}</option>`).join("") : "";
  dialog(`<h3>Create a domain</h3><label>xm/xl config file<br><textarea name="config" required placeholder='name = "web1"\nmemory = 128\nkernel = "/var/lib/gridvm/images/tiny/vmlinuz"'></textarea></label>
    ${hosts ? `<label>Host <select name="host"><option value="">placement decides</option>${hosts}</select></label>` : ""}
    <label><input type="checkbox" name="define"> define only (managed, not started: xm new)</label>${buttons("Create")}`,
    async (fd) => !!(await act("domain.create", "new", { config: fd.get("config"), host: fd.get("host") || null,
                                                          managed: !!fd.get("define"), start: !fd.get("define") })));
}

function migrateDialog(name) {
  const d = S.domains.find((x) => x.name === name) || {};
  const hosts = (S.hosts?.hosts || []).filter((h) => h.name !== d.host && ["up", "maintenance"].includes(h.state));
  const choose = S.hosts?.cluster?.joined
    ? `<label>To host <select name="host" id="migrate-host">${hosts.map((h) => `<option>${esc(h.name)}</option>`).join("")}</select></label>`
    : `<label>To gridvmd at <input name="address" placeholder="10.0.0.12:8002" required></label>`;
  dialog(`<h3>Migrate ${esc(name)}</h3>${choose}<label><input type="checkbox" name="live" checked> live (keep the guest running during the copy)</label>
    <label>Bandwidth <input name="bandwidth" id="migrate-bandwidth" type="number" min="1" placeholder="unlimited"> MiB/s</label>${buttons("Migrate")}`,
    async (fd) => !!(await act("domain.migrate", name, { host: fd.get("host") || null, address: fd.get("address") || null,
                                                         live: !!fd.get("live"), bandwidth: Number(fd.get("bandwidth")) || null })));
}

function weightDialog(service, domain, weight) {
  dialog(`<h3>${esc(service)}: weight of ${esc(domain)}</h3><input name="weight" id="weight" type="number" min="0" max="65535" value="${weight}">
    <p class="muted">0: no new connections (quiesced)</p>${buttons("Set")}`,
    async (fd) => !!(await act("service.weight", service, { domain, weight: Number(fd.get("weight")) })));
}

async function taskDialog(id) {
  dialog(`<h3 id="task-title">task ${esc(id)}</h3><pre class="log" id="task-log"></pre><p id="task-status"></p>${buttons()}`, async () => true);
  let seen = 0;
  taskDialog.open = id;
  taskDialog.refresh = async () => {
    if (taskDialog.open !== id) return;
    const t = await api("GET", `tasks/${encodeURIComponent(id)}?after=${seen}`).catch(() => null);
    if (!t || taskDialog.open !== id) return;
    $("#task-title").textContent = `${t.action} ${t.target} (${t.id})`;
    for (const l of t.log) { seen = l.seq; $("#task-log").textContent += `${new Date(l.time * 1000).toLocaleTimeString()} ${l.line}\n`; }
    $("#task-status").innerHTML = `${badge(t.state)} ${esc(t.error || "")} <span class="muted">by ${esc(t.user)}</span>`;
  };
  taskDialog.refresh();
}

// ----- a domain: details, live graphs, serial console ---------------------------------------

const CHARTS = [
  ["CPU %", [["cpu", (s) => s.cpu_percent]]],
  ["Memory MiB", [["memory", (s) => s.memory], ["maxmem", (s) => s.maxmem]]],
  ["Network B/s", [["rx", (s) => s.net_rx_rate], ["tx", (s) => s.net_tx_rate]]],
  ["Disk B/s", [["read", (s) => s.block_read_rate], ["write", (s) => s.block_write_rate]]],
];
const COLORS = ["#2457a6", "#c62828"];

function openDetail(name, popout) {
  if (detail && detail.name === name) { updateDetail(); return; }
  closeDetail();
  document.body.classList.toggle("popout", !!popout);
  const verb = (v, label, cls = "secondary") => `<button class="${cls}" data-action="${v}" onclick="domainAct('${v}')">${label}</button>`;
  $("#view").innerHTML = `<h2><a href="#/domains">Domains</a> / <span id="detail-name">${esc(name)}</span>
      <span id="detail-state"></span> <span id="detail-progress"></span></h2>
    <div class="toolbar" id="detail-actions">${verb("start", "Start", "")}${verb("shutdown", "Shut down")}${verb("reboot", "Reboot")}
      ${verb("pause", "Pause")}${verb("unpause", "Resume")}${verb("destroy", "Destroy", "danger")}
      <button class="secondary" data-action="migrate" onclick="migrateDialog(detail.name)">Migrate…</button>
      <button class="secondary" data-action="console" onclick="openConsole()">Console</button>
      <button class="secondary" data-action="vnc" id="vnc-button" onclick="openVnc()" hidden>Screen</button>
      <button class="secondary" onclick="window.open('#/console/${encodeURIComponent(name)}', '_blank', 'width=900,height=600')">Pop out console</button></div>
    <dl class="kv" id="detail-info"></dl>
    <div class="console" id="console" hidden></div>
    <div class="vnc" id="vnc" hidden></div>
    <div class="charts">${CHARTS.map((c, i) => `<div class="chart" id="chart-${i}"></div>`).join("")}</div>`;
  detail = { name, data: [[], ...CHARTS.flatMap((c) => c[1].map(() => []))], charts: [] };
  CHARTS.forEach(([title, series], i) => {
    const el = $(`#chart-${i}`);
    detail.charts.push(new uPlot({ title, width: Math.max(380, el.clientWidth - 16), height: 180,
      series: [{}, ...series.map(([label], j) => ({ label, stroke: COLORS[j], width: 1.5 }))],
      axes: [{}, { size: 60 }] }, [[], ...series.map(() => [])], el));
  });
  streamStats(name);
  updateDetail();
  if (popout) openConsole();
}

function closeDetail() {
  if (!detail) return;
  detail.stream?.close();
  detail.ws?.close();
  detail.term?.dispose();
  detail.rfb?.disconnect();
  detail = null;
  document.body.classList.remove("popout");
}

function streamStats(name) {
  const es = new EventSource(`api/domains/${encodeURIComponent(name)}/stats`);
  detail.stream = es;
  const samples = [];
  const draw = () => {
    if (!detail || detail.stream !== es) return;
    const t = samples.map((s) => s.time);
    CHARTS.forEach(([, series], i) => detail.charts[i].setData([t, ...series.map(([, f]) => samples.map(f))]));
  };
  es.addEventListener("history", (e) => { samples.push(...JSON.parse(e.data).samples); draw(); });
  es.addEventListener("samples", (e) => { samples.push(...JSON.parse(e.data)); samples.splice(0, Math.max(0, samples.length - 300)); draw(); });
}

function updateDetail() {
  if (!detail) return;
  const d = S.domains.find((x) => x.name === detail.name);
  if (!d) {
    $("#detail-state").innerHTML = badge("gone");
    $("#detail-info").innerHTML = `<dt>state</dt><dd>this domain no longer exists</dd>`;
    document.querySelectorAll("#detail-actions button[data-action]").forEach((b) => { b.disabled = true; });
    return;
  }
  $("#detail-state").innerHTML = badge(d.state);
  const mig = runningTask("domain.migrate", d.name);
  $("#detail-progress").innerHTML = mig
    ? `<progress id="migrate-progress" max="100" value="${mig.progress?.percent || 0}"></progress>
       <span class="muted" id="migrate-phase">${esc(mig.progress?.phase || "starting")} ${(mig.progress?.percent || 0).toFixed(0)}%</span>` : "";
  const ha = d.ha?.ha && d.ha.ha !== "off" ? `${d.ha.ha}, priority ${d.ha.ha_priority}${d.ha.ha_group ? ", group " + d.ha.ha_group : ""}` : "off";
  $("#detail-info").innerHTML = [["host", d.host || "localhost"], ["domid", d.domid ?? "-"], ["type", d.type],
    ["vCPUs", d.vcpus], ["memory", `${mib(d.memory)} (max ${mib(d.maxmem)})`], ["IPs", (d.ips || []).join(", ") || "-"],
    ["uptime", secs(d.uptime)], ["CPU", d.cpu_percent != null ? `${d.cpu_percent.toFixed(1)}%` : "-"], ["HA", ha],
    ["UUID", d.uuid]].map(([k, v]) => `<dt>${k}</dt><dd id="detail-${k.toLowerCase()}">${esc(v)}</dd>`).join("");
  const on = d.domid != null, st = d.state;
  const allowed = { start: !on, shutdown: on && st !== "paused", reboot: on && st !== "paused", pause: on && st === "running",
                    unpause: on && st === "paused", destroy: on, migrate: on && !mig, console: on,
                    vnc: on && d.vnc };
  document.querySelectorAll("#detail-actions button[data-action]").forEach((b) => {
    b.disabled = !admin() || !allowed[b.dataset.action];
  });
  $("#vnc-button").hidden = !d.vnc;
}

function domainAct(verb) {
  const name = detail.name;
  if (verb === "destroy") confirmAct(`Destroy ${name}? The guest stops at once (pull the plug).`, "domain.destroy", name);
  else act(`domain.${verb}`, name);
}

function openConsole() {
  if (!detail || detail.term) return;
  const el = $("#console");
  el.hidden = false;
  const term = new Terminal({ cursorBlink: true, fontSize: 13, scrollback: 5000 });
  const fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(el);
  fit.fit();
  const enc = new TextEncoder();
  term.onData((d) => { if (detail?.ws?.readyState === WebSocket.OPEN) detail.ws.send(enc.encode(d)); });
  detail.term = term;
  window.gridvmConsole = term;     // for tests and the curious: the xterm.js Terminal
  connectConsole(detail.name, term, 0);
  term.focus();
}

// The graphical console: noVNC (an ES module, loaded when first needed) on the domain's VNC
// websocket; a VNC password, if the domain has one, is asked for here and checked by QEMU.
async function openVnc() {
  if (!detail || detail.rfb) return;
  const el = $("#vnc"), name = detail.name;
  el.hidden = false;
  const { default: RFB } = await import(new URL("vendor/novnc/core/rfb.js", document.baseURI).href);
  if (!detail || detail.name !== name || detail.rfb) return;
  const rfb = new RFB(el, `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ui/ws/vnc/${encodeURIComponent(name)}`);
  rfb.scaleViewport = true;
  rfb.addEventListener("credentialsrequired", () => {
    dialog(`<h3>VNC password of ${esc(name)}</h3><input name="password" id="vnc-password" type="password" autocomplete="off" maxlength="8">${buttons("Connect")}`,
      async (fd) => (rfb.sendCredentials({ password: String(fd.get("password")) }), true));
  });
  rfb.addEventListener("connect", () => { el.dataset.state = "connected"; });
  rfb.addEventListener("disconnect", (e) => {
    el.dataset.state = e.detail.clean ? "closed" : "failed";
    if (detail && detail.rfb === rfb) detail.rfb = null;
  });
  detail.rfb = rfb;
  window.gridvmVnc = rfb;     // for tests and the curious: the noVNC RFB object
}

// The serial console's websocket; after a migration or a reboot it reconnects to wherever
// the domain runs now.
function connectConsole(name, term, retries) {
  const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ui/ws/console/${encodeURIComponent(name)}`);
  ws.binaryType = "arraybuffer";
  ws.onopen = () => {      // data-connections counts the console's connections (tests wait on it)
    retries = 0;
    const el = $("#console");
    el.dataset.connections = String(Number(el.dataset.connections || 0) + 1);
  };
  ws.onmessage = (e) => term.write(new Uint8Array(e.data));
  ws.onclose = () => {
    if (!detail || detail.ws !== ws) return;
    detail.ws = null;
    const d = S.domains.find((x) => x.name === name);
    if (d && d.domid != null && retries < 5) {
      setTimeout(() => { if (detail && detail.term === term) connectConsole(name, term, retries + 1); }, 1000);
    } else {
      term.write("\r\n\x1b[33m[console closed]\x1b[0m\r\n");
    }
  };
  detail.ws = ws;
}

start();
