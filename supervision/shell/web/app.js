// The operator's live page: a client of the control channel like any other (same JSON-RPC
// methods, same auth). Plain script, no dependencies, no build step.
//
// Safety: every server-provided string reaches the page through textContent or an
// attribute value, never through innerHTML, so event data cannot inject markup.
"use strict";

const HISTORY = 200;            // events replayed on the first connection
const MAX_ROWS = 1000;          // timeline rows kept in the page
const STATUS_EVERY_MS = 2000;   // runtime.status, besides the refresh after a transition
const HEALTH_EVERY_MS = 2000;
const TICK_MS = 250;            // countdowns and "time in state"
const CALL_TIMEOUT_MS = 15000;  // every request has a deadline
const RECONNECT_MS = [250, 500, 1000, 2000, 5000];
const PAGE_SUBPROTOCOL = "mt5sup.v1";         // the server answers with this one
const BEARER_SUBPROTOCOL = "mt5sup.bearer.";  // + base64url(token): an authenticated handshake
const FAULTS = {
  mt5: ["terminal_crash", "ipc_timeout", "hang", "broker_disconnect", "auth_failure",
        "autotrading_off"],
  questdb: ["db_stop", "db_kill", "db_start"],
};

const page = {
  ws: null,
  nextId: 1,
  pending: new Map(),       // request id -> {resolve, reject, timer}
  token: null,              // kept in memory only, re-sent after a reconnect
  authenticated: false,
  subscription: null,       // the one subscription whose notifications are applied
  lastSeq: 0,               // last event applied: resume point, dedup bound
  actors: new Map(),        // name -> runtime.status row (updated by events in between)
  order: [],
  reconnects: 0,            // failed attempts in a row (the retry delay grows)
  retryTimer: null,
  connecting: false,        // an attempt is under way (until its socket opens or fails)
  offerToken: true,         // next handshake carries the token (alternates after refusals)
  connections: 0,           // connections opened so far
  statusRefreshes: 0,       // runtime.status answers applied so far
  statusTimer: null,
  seenActors: new Set(),
  seenKinds: new Set(),
  eventCount: 0,
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));  // text, never markup
  }
  return node;
}

function notice(kind, text) {
  const box = $("notice");
  box.hidden = false;
  box.dataset.kind = kind;
  box.textContent = text;
}

// ------------------------------------------------------------------ JSON-RPC
function rpc(method, params) {
  return new Promise((resolve, reject) => {
    const ws = page.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) {
      reject(new Error("not connected to the control channel"));
      return;
    }
    const id = page.nextId++;
    const timer = setTimeout(() => {
      page.pending.delete(id);
      reject(new Error(`${method}: no reply within ${CALL_TIMEOUT_MS / 1000} s`));
    }, CALL_TIMEOUT_MS);
    page.pending.set(id, { resolve, reject, timer });
    const message = { jsonrpc: "2.0", id, method };
    if (params !== undefined) message.params = params;
    ws.send(JSON.stringify(message));
  });
}

class RpcError extends Error {
  constructor(error) {
    super(error.message);
    this.code = error.code;
    this.data = error.data;
  }
}

function onMessage(text) {
  const message = JSON.parse(text);
  if ("id" in message && message.id !== null && page.pending.has(message.id)) {
    const waiter = page.pending.get(message.id);
    page.pending.delete(message.id);
    clearTimeout(waiter.timer);
    if ("error" in message) waiter.reject(new RpcError(message.error));
    else waiter.resolve(message.result);
    return;
  }
  const params = message.params || {};
  // Notifications of a subscription we replaced (history probe, overflow) are stale.
  if (params.subscription !== undefined && params.subscription !== page.subscription) return;
  switch (message.method) {
    case "events.batch": applyEvents(params.events); break;
    case "events.event": applyEvents([params]); break;
    case "events.live": setConn("open", "live"); break;
    case "events.overflow": onOverflow(params); break;
    case "events.closed": marker(`the runtime is stopping: ${params.reason}`); break;
  }
}

// ------------------------------------------------------------------ connection
async function connectionConfig() {
  const reply = await fetch("/ui/config.json",
                            { cache: "no-store", signal: AbortSignal.timeout(CALL_TIMEOUT_MS) });
  const config = await reply.json();
  if (!config.control) throw new Error("the control channel is disabled on this runtime");
  const host = config.control.host || location.hostname;
  const shown = host.includes(":") ? `[${host}]` : host;
  return `ws://${shown}:${config.control.port}/`;
}

async function connect() {
  if (page.connecting) return;  // one attempt at a time (a sign-in may ask for one)
  page.connecting = true;
  setConn("connecting", "connecting…");
  let url;
  try {
    url = await connectionConfig();
  } catch (err) {
    page.connecting = false;
    setConn("closed", `no control channel: ${err.message}`);
    return retryLater();
  }
  // With the token, the handshake itself is authenticated (a browser cannot send an
  // Authorization header): the page then gets in even when unauthenticated sockets fill
  // the server, through the connections reserved for the token.
  const withToken = page.offerToken ? page.token : null;
  const protocols = [PAGE_SUBPROTOCOL];
  if (withToken !== null) protocols.push(BEARER_SUBPROTOCOL + base64url(withToken));
  const ws = new WebSocket(url, protocols);
  page.ws = ws;
  let opened = false;
  ws.onmessage = (e) => onMessage(e.data);
  ws.onopen = () => {
    opened = true;
    page.connecting = false;
    page.offerToken = true;
    onOpen(withToken).catch((err) => notice("error", `control channel: ${err.message}`));
  };
  ws.onclose = () => {
    if (page.ws !== ws) return;
    page.connecting = false;
    if (!opened && page.token !== null) {
      // Refused at the handshake. A browser cannot tell why (a wrong token, a full server,
      // the port down): alternate with and without the token in the handshake. Without it,
      // a connection that opens sends `auth`, and only a refusal of that signs out.
      page.offerToken = withToken === null;
      if (withToken !== null) {
        notice("error", "the control channel refused a connection with the token (a wrong " +
                        "token, or no room even in the reserved connections); retrying");
      }
    }
    page.ws = null;
    page.subscription = null;
    page.authenticated = false;
    for (const waiter of page.pending.values()) {
      clearTimeout(waiter.timer);
      waiter.reject(new Error("the control channel closed"));
    }
    page.pending.clear();
    setConn("closed", "disconnected; reconnecting…");
    retryLater();
  };
}

function retryLater() {
  const delay = RECONNECT_MS[Math.min(page.reconnects, RECONNECT_MS.length - 1)];
  page.reconnects += 1;
  page.retryTimer = setTimeout(connect, delay);
}

function base64url(text) {
  const bytes = new TextEncoder().encode(text);
  let binary = "";
  for (const b of bytes) binary += String.fromCharCode(b);
  return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

async function onOpen(withToken) {
  page.reconnects = 0;
  page.connections += 1;
  setConn("connecting", "replaying…");
  if (withToken !== null && withToken === page.token) signedIn(withToken);
  else if (page.token !== null) await authenticate(page.token);
  await subscribe();
  await refreshStatus();
}

function setConn(status, text) {
  const badge = $("conn");
  badge.dataset.status = status;
  badge.textContent = `control: ${text}`;
}

// ------------------------------------------------------------------ events
async function subscribe() {
  // Resume after the last event applied (no gap, no duplicate: applyEvents skips seq <=
  // lastSeq). The first time, look up the head and replay a window of history.
  let since = page.lastSeq;
  if (since === 0) {
    const probe = await rpc("events.subscribe", { batch: true });
    if (probe.head_seq === 0) {
      page.subscription = probe.subscription;
      return;
    }
    await rpc("events.unsubscribe", { subscription: probe.subscription });
    since = Math.max(0, probe.head_seq - HISTORY);
  }
  const reply = await rpc("events.subscribe", { batch: true, since_seq: since });
  page.subscription = reply.subscription;
}

async function onOverflow(params) {
  // The server dropped events for us; fetch them from its log by subscribing again from
  // the last one we applied, and drop the old subscription.
  marker(`events.overflow: ${params.missed} events missed after seq ` +
         `${params.resume_after_seq}; resuming from seq ${page.lastSeq}`);
  const old = page.subscription;
  page.subscription = null;
  try {
    await rpc("events.unsubscribe", { subscription: old });
    await subscribe();
  } catch (err) {
    notice("error", `resuming after an overflow failed: ${err.message}`);
  }
}

function applyEvents(events) {
  const body = $("timeline-body");
  const fragment = document.createDocumentFragment();
  let transitions = false;
  for (const event of events) {
    if (event.seq <= page.lastSeq) continue;  // already shown (replay overlap)
    page.lastSeq = event.seq;
    page.eventCount += 1;
    fragment.prepend(eventRow(event));
    if (event.to && page.actors.has(event.actor)) {
      const row = page.actors.get(event.actor);
      row.state = event.to;
      row.since = event.ts;
      if (event.attempt !== null && event.attempt !== undefined) row.attempt = event.attempt;
      if (event.error) row.last_error = { ...event.error, at: event.ts };
      if (event.to === "CONNECTED") row.next_retry_at = null;
      transitions = true;
    }
    if (event.data && event.data.next_at && page.actors.has(event.actor)) {
      page.actors.get(event.actor).next_retry_at = event.data.next_at;  // countdown at once
    }
    if (event.kind === "state_changed" || event.kind === "backoff_scheduled") {
      transitions = true;
    }
    learn(page.seenActors, $("filter-actor"), event.actor);
    learn(page.seenKinds, $("filter-kind"), event.kind);
  }
  body.prepend(fragment);
  while (body.rows.length > MAX_ROWS) body.deleteRow(-1);
  $("last-seq").textContent = String(page.lastSeq);
  $("event-count").textContent = `(${page.eventCount} received)`;
  if (transitions) {
    renderTree();
    scheduleStatus(100);  // the status has the details an event lacks (next retry)
  }
}

function eventRow(event) {
  const detail = [];
  if (event.from || event.to) detail.push(`${event.from ?? "∅"} → ${event.to ?? "∅"}`);
  if (event.attempt !== null && event.attempt !== undefined) detail.push(`attempt ${event.attempt}`);
  if (event.delay_s !== null && event.delay_s !== undefined) detail.push(`in ${event.delay_s} s`);
  if (event.error) detail.push(`${event.error.code}: ${event.error.message}`);
  if (event.data) detail.push(JSON.stringify(event.data));
  const row = el("tr", { class: "event", "data-seq": String(event.seq),
                         "data-actor": String(event.actor), "data-kind": String(event.kind) },
    el("td", { class: "seq" }, event.seq),
    el("td", { class: "time" }, timeOfDay(event.ts)),
    el("td", { class: "actor" }, event.actor),
    el("td", { class: "kind" }, event.kind),
    el("td", { class: "detail" }, detail.join(" · ")));
  if (!matchesFilter(row)) row.classList.add("hidden");
  return row;
}

function marker(text) {
  const row = el("tr", { class: "marker", "data-marker": "1" },
    el("td", { colspan: "5" }, text));
  $("timeline-body").prepend(row);
}

function learn(seen, select, value) {
  if (seen.has(value)) return;
  seen.add(value);
  select.append(el("option", { value: String(value) }, value));
}

function matchesFilter(row) {
  const actor = $("filter-actor").value;
  const kind = $("filter-kind").value;
  return (!actor || row.dataset.actor === actor) && (!kind || row.dataset.kind === kind);
}

function applyFilter() {
  for (const row of $("timeline-body").rows) {
    if (row.classList.contains("marker")) continue;
    row.classList.toggle("hidden", !matchesFilter(row));
  }
}

// ------------------------------------------------------------------ the tree
function scheduleStatus(delayMs) {
  if (page.statusTimer !== null) return;
  page.statusTimer = setTimeout(() => {
    page.statusTimer = null;
    refreshStatus().catch(() => {});  // the next poll retries; the badge shows the channel
    refreshHealth();
  }, delayMs);
}

async function refreshStatus() {
  const status = await rpc("runtime.status");
  page.order = status.actors.map((row) => row.name);
  page.actors = new Map(status.actors.map((row) => [row.name, row]));
  page.statusRefreshes += 1;
  renderTree();
}

function renderTree() {
  // Rows are kept and updated in place, so a fault chosen or a duration being typed in a
  // row's controls survives the refreshes.
  const body = $("tree-body");
  if (!body.querySelector("tr.root")) {
    body.append(el("tr", { class: "root" }, el("td", { class: "actor", colspan: "9" }, "supervisor")));
  }
  const present = new Set(page.order);
  for (const tr of [...body.querySelectorAll("tr.actor")]) {
    if (!present.has(tr.dataset.actor)) tr.remove();
  }
  page.order.forEach((name, index) => {
    let tr = body.querySelector(`tr.actor[data-actor="${CSS.escape(name)}"]`);
    if (!tr) tr = newActorRow(name);
    updateActorRow(tr, page.actors.get(name), index === page.order.length - 1);
    body.append(tr);  // moves it into place (keeps its controls' values)
  });
  tick();
}

function newActorRow(name) {
  return el("tr", { class: "actor", "data-actor": String(name) },
    el("td", { class: "actor" }, el("span", { class: "branch" }), el("span", { class: "name" }, name)),
    el("td", { class: "state" }),
    el("td", { class: "attempt" }),
    el("td", { class: "retry mono" }),
    el("td", { class: "breaker" }),
    el("td", { class: "since mono" }),
    el("td", { class: "restarts" }),
    el("td", { class: "error" }),
    el("td", { class: "actions" }, ...actions(name)));
}

function updateActorRow(tr, row, last) {
  const cell = (name) => tr.querySelector(`td.${name}`);
  tr.dataset.state = String(row.state);
  tr.querySelector(".branch").textContent = last ? "└─ " : "├─ ";
  cell("state").textContent = String(row.state);
  cell("attempt").textContent = row.attempt ? String(row.attempt) : "";
  cell("retry").dataset.at = row.next_retry_at || "";
  cell("breaker").dataset.breaker = String(row.breaker ?? "");
  cell("breaker").textContent = String(row.breaker ?? "–");
  cell("since").dataset.at = row.since || "";
  cell("restarts").textContent = String(row.restarts ?? "");
  cell("error").textContent = row.last_error
    ? `${row.last_error.code}: ${row.last_error.message}` : "";
}

function actions(name) {
  const out = [el("button", { class: "restart", "data-actor": name,
                              onclick: () => act("actor.restart", { actor: name }) }, "restart")];
  const family = name === "mt5" || name.startsWith("mt5-") ? "mt5" : name;
  const faults = FAULTS[family];
  if (faults) {
    const select = el("select", { class: "fault" },
      ...faults.map((f) => el("option", { value: f }, f)));
    const duration = el("input", { class: "duration", type: "number", min: "0", step: "any",
                                   placeholder: "s", title: "heal after (s); empty: until clear" });
    const inject = () => {
      const params = { fault: select.value, actor: name };
      if (duration.value) params.duration_s = Number(duration.value);
      act("sim.inject", params);
    };
    out.push(" ", select, duration,
      el("button", { class: "inject", onclick: inject }, "inject"),
      el("button", { class: "clear", onclick: () => act("sim.inject", { fault: "clear", actor: name }) },
         "clear"));
  }
  return out;
}

async function act(method, params) {
  const what = `${method} ${params.fault ?? ""} ${params.actor ?? ""}`.replace(/\s+/g, " ").trim();
  try {
    await rpc(method, params);
    notice("ok", `${what}: ok`);
    scheduleStatus(50);
  } catch (err) {
    notice("error", `${what}: refused: ${err.message}`);
  }
}

function tick() {
  const now = Date.now();
  for (const cell of document.querySelectorAll("#tree-body td.retry")) {
    const at = cell.dataset.at;
    const row = page.actors.get(cell.parentElement.dataset.actor);
    cell.textContent = at && row && row.state !== "CONNECTED"
      ? `in ${Math.max(0, (Date.parse(at) - now) / 1000).toFixed(1)} s` : "";
  }
  for (const cell of document.querySelectorAll("#tree-body td.since")) {
    const at = cell.dataset.at;
    cell.textContent = at ? duration((now - Date.parse(at)) / 1000) : "";
  }
}

function duration(seconds) {
  const s = Math.max(0, seconds);
  if (s < 60) return `${s.toFixed(1)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.floor(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

function timeOfDay(ts) {
  const t = new Date(ts);
  return Number.isNaN(t.getTime()) ? String(ts) : t.toISOString().slice(11, 23);
}

// ------------------------------------------------------------------ health and auth
async function refreshHealth() {
  const badge = $("health");
  try {
    const reply = await fetch("/health",
                              { cache: "no-store", signal: AbortSignal.timeout(CALL_TIMEOUT_MS) });
    const doc = await reply.json();
    badge.dataset.status = doc.status;
    badge.textContent = `health: ${doc.status}`;
    $("health-output").textContent = doc.output || "";
  } catch (err) {
    badge.dataset.status = "fail";
    badge.textContent = "health: unreachable";
  }
}

function signedIn(token) {
  page.token = token;
  page.authenticated = true;
  $("auth-state").textContent = "signed in";
}

function signedOut() {
  page.token = null;
  page.authenticated = false;
  $("auth-state").textContent = "read-only";
}

async function authenticate(token) {
  try {
    await rpc("auth", { token });
    signedIn(token);
    return true;
  } catch (err) {
    signedOut();
    notice("error", `auth: ${err.message}`);
    return false;
  }
}

function signInOnNextConnection(token) {
  // No open connection (e.g. the server is full of other sockets): connect again now,
  // offering the token in the handshake.
  page.token = token;
  page.offerToken = true;
  notice("ok", "signing in on a new connection…");
  if (page.ws === null && !page.connecting) {
    clearTimeout(page.retryTimer);
    page.reconnects = 0;
    connect();
  }
}

function main() {
  $("filter-actor").addEventListener("change", applyFilter);
  $("filter-kind").addEventListener("change", applyFilter);
  $("auth-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const input = $("token");
    const token = input.value;
    input.value = "";
    if (page.ws === null || page.ws.readyState !== WebSocket.OPEN) {
      signInOnNextConnection(token);
    } else if (await authenticate(token)) {
      notice("ok", "signed in: restart and faults enabled");
    }
  });
  setInterval(tick, TICK_MS);
  // Health is also refreshed with every status refresh (after each transition).
  setInterval(() => { if (page.subscription !== null) scheduleStatus(0); }, STATUS_EVERY_MS);
  setInterval(refreshHealth, HEALTH_EVERY_MS);
  refreshHealth();
  connect();
}

document.addEventListener("DOMContentLoaded", main);
