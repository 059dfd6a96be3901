// The saga inspector: a page per hash route, data from the instance's own API. Everything
// shown is inserted as text (textContent), never as markup.
"use strict";

const TOKEN_KEY = "saga-streams-token";
let topology = null;

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

async function api(path, options = {}) {
  const headers = Object.assign({ Accept: "application/json" }, options.headers || {});
  if (token()) headers.Authorization = "Bearer " + token();
  if (options.body) headers["Content-Type"] = "application/json";
  const response = await fetch(path, Object.assign({}, options, { headers }));
  let body = null;
  try {
    body = await response.json();
  } catch (e) {
    body = { error: "HTTP " + response.status };
  }
  if (response.status === 401) {
    notice("The API wants the token: enter it above (Use token).", true);
  }
  return { status: response.status, body };
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "onclick" || name === "onsubmit" || name === "onchange") node[name] = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function notice(text, bad) {
  const box = document.getElementById("notice");
  box.textContent = text;
  box.className = bad ? "bad" : "good";
  box.hidden = !text;
}

function show(...nodes) {
  const main = document.getElementById("main");
  main.replaceChildren(...nodes);
}

function text(v) {
  if (v === null || v === undefined || v === "") return "-";
  return typeof v === "object" ? JSON.stringify(v) : String(v);
}

function sagaLink(id) {
  return el("a", { href: "#/saga/" + encodeURIComponent(id), class: "saga-link" }, id);
}

function statusBadge(status) {
  return el("span", { class: "status status-" + String(status).toLowerCase() }, status);
}

function table(headers, rows, id) {
  return el("div", { class: "scroll" },
    el("table", { id },
      el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
      el("tbody", {}, rows.map((cells) => el("tr", {}, cells.map((c) => el("td", {}, c)))))));
}

function outcomeText(o) {
  if (!o) return "-";
  return o.kind + (o.reason ? " (" + o.reason + ")" : "");
}

function failure(what, response) {
  return el("p", { class: "error" }, what + ": " + text(response.body && response.body.error));
}

// The statuses an operator looks at first.
const ATTENTION = ["COMPENSATION_STUCK", "COMPENSATING"];

async function overview() {
  const [counts, dlq] = await Promise.all([api("/overview"), api("/dlq")]);
  const parts = [el("h1", {}, "Overview")];
  if (counts.status !== 200) {
    parts.push(failure("Saga counts", counts));
  } else {
    const entries = Object.entries(counts.body.counts || {});
    entries.sort((a, b) => {
      const rank = (s) => (ATTENTION.indexOf(s) >= 0 ? ATTENTION.indexOf(s) : 10);
      return rank(a[0]) - rank(b[0]) || a[0].localeCompare(b[0]);
    });
    parts.push(el("section", { id: "status-counts", class: "cards" },
      entries.length === 0 ? el("p", {}, "No saga yet.") : entries.map(([status, n]) =>
        el("a", { class: "card" + (ATTENTION.includes(status) ? " attention" : ""),
                  href: "#/sagas?status=" + encodeURIComponent(status) },
          el("span", { class: "count" }, n), statusBadge(status)))));
    for (const u of counts.body.unavailable || []) {
      parts.push(el("p", { class: "error" }, "partition " + u.partition + " not counted: " + u.reason));
    }
  }
  parts.push(el("h2", {}, "Needs attention"));
  const attention = el("div", { id: "attention" }, "Loading…");
  parts.push(attention);
  parts.push(el("h2", {}, "Failures and timeouts in the last 24 hours"));
  const recent = el("div", { id: "recent-failures" }, "Loading…");
  parts.push(recent);
  parts.push(el("h2", {}, "Dead letters"));
  if (dlq.status !== 200) {
    parts.push(failure("Dead letters", dlq));
  } else {
    const rows = [];
    for (const t of dlq.body.topics || []) {
      const reasons = Object.entries(t.reasons || {});
      if (reasons.length === 0) rows.push([el("a", { href: "#/dlq/" + encodeURIComponent(t.topic) }, t.topic), "-", 0]);
      for (const [reason, n] of reasons) {
        rows.push([el("a", { href: "#/dlq/" + encodeURIComponent(t.topic) + "?reason=" + encodeURIComponent(reason) }, t.topic), reason, n]);
      }
    }
    parts.push(table(["topic", "reason", "records"], rows, "dlq-counts"));
  }
  show(...parts);
  const rows = [];
  for (const status of ATTENTION) {
    const r = await listAll("limit=20&status=" + encodeURIComponent(status), 20, 20);
    for (const s of r.found) rows.push(s);
  }
  attention.replaceChildren(rows.length === 0 ? el("p", {}, "Nothing stuck or compensating.")
    : table(["saga", "status", "step awaited", "deadline", "updated"],
      rows.map((s) => [sagaLink(s.saga_id), statusBadge(s.status), text(s.step_awaited), text(s.deadline), text(s.updated_at)]), "attention-table"));
  const failed = [];
  const ended = ["FAILED", topology ? topology.compensated_state : "REFUNDED", "COMPENSATION_STUCK"];
  for (const status of ended) {
    const r = await listAll("limit=20&newer_than=24h&status=" + encodeURIComponent(status), 20, 20);
    for (const s of r.found) failed.push(s);
  }
  recent.replaceChildren(failed.length === 0 ? el("p", {}, "None.")
    : table(["saga", "status", "outcome", "updated"],
      failed.map((s) => [sagaLink(s.saga_id), statusBadge(s.status), outcomeText(s.outcome), text(s.updated_at)]), "failures-table"));
}

// Sagas of a list query, following the API's cursors (each request reads a bounded number of
// records) until `want` are found or `pages` requests were made.
async function listAll(q, want, pages) {
  const found = [];
  let cursor = null;
  for (let i = 0; i < pages && found.length < want; i++) {
    const r = await api("/sagas?" + q + (cursor ? "&cursor=" + encodeURIComponent(cursor) : ""));
    if (r.status !== 200) return { found, error: r };
    for (const s of r.body.sagas) found.push(s);
    if ((r.body.unavailable || []).length) return { found, error: { body: { error: r.body.unavailable.map((u) => "partition " + u.partition + ": " + u.reason).join("; ") } } };
    cursor = r.body.next_cursor;
    if (!cursor) break;
  }
  return { found: found.slice(0, want), error: null };
}

function query(hash) {
  const at = hash.indexOf("?");
  return new URLSearchParams(at >= 0 ? hash.slice(at + 1) : "");
}

async function sagas(params) {
  const fields = ["status", "step", "older_than", "newer_than", "correlation_id"];
  const inputs = {};
  const form = el("form", { id: "filters", class: "filters" },
    fields.map((f) => {
      inputs[f] = el("input", { id: "filter-" + f, name: f, value: params.get(f) || "", placeholder: f.replace("_", " ") });
      return el("label", {}, f.replace("_", " "), inputs[f]);
    }),
    el("button", { type: "submit", id: "filter-go" }, "List"));
  form.onsubmit = (e) => {
    e.preventDefault();
    const q = new URLSearchParams();
    for (const f of fields) if (inputs[f].value.trim()) q.set(f, inputs[f].value.trim());
    location.hash = "#/sagas?" + q.toString();
  };
  const q = new URLSearchParams();
  for (const f of fields) if (params.get(f)) q.set(f, params.get(f));
  q.set("limit", "50");
  if (params.get("cursor")) q.set("cursor", params.get("cursor"));
  const r = await api("/sagas?" + q.toString());
  const parts = [el("h1", {}, "Sagas"), form];
  if (r.status !== 200) {
    parts.push(failure("Listing", r));
    return show(...parts);
  }
  parts.push(table(["saga", "partition", "status", "step awaited", "deadline", "correlation id", "updated", "outcome"],
    r.body.sagas.map((s) => [sagaLink(s.saga_id), s.partition, statusBadge(s.status), text(s.step_awaited), text(s.deadline),
      text(s.correlation_id), text(s.updated_at), outcomeText(s.outcome)]), "saga-list"));
  if (r.body.sagas.length === 0) parts.push(el("p", {}, "No saga matches."));
  for (const u of r.body.unavailable || []) {
    parts.push(el("p", { class: "error" }, "partition " + u.partition + " not listed: " + u.reason));
  }
  if (r.body.next_cursor) {
    const next = new URLSearchParams(params);
    next.set("cursor", r.body.next_cursor);
    parts.push(el("p", {}, el("a", { href: "#/sagas?" + next.toString(), id: "next-page", class: "button" }, "Next page")));
  }
  show(...parts);
}

// The state machine: states in layers from the start, transitions as arrows, the saga's
// current state highlighted.
function stateMachine(current) {
  if (!topology) return el("p", {}, "");
  const edges = topology.edges.filter((e) => e.from !== "[*]" || true);
  const layer = { "[*]": 0 };
  let changed = true;
  for (let round = 0; changed && round < 50; round++) {
    changed = false;
    for (const e of edges) {
      if (layer[e.from] === undefined || e.to === e.from) continue;
      const next = layer[e.from] + 1;
      if (layer[e.to] === undefined) {
        layer[e.to] = next;
        changed = true;
      }
    }
  }
  const columns = {};
  for (const [state, l] of Object.entries(layer)) (columns[l] = columns[l] || []).push(state);
  const w = 170, h = 54, boxW = 150, boxH = 30;
  const pos = {};
  let maxRows = 1;
  for (const [l, states] of Object.entries(columns)) {
    states.forEach((s, i) => { pos[s] = { x: 10 + Number(l) * w, y: 10 + i * h }; });
    maxRows = Math.max(maxRows, states.length);
  }
  const width = 20 + Object.keys(columns).length * w;
  const height = 20 + maxRows * h;
  const drawing = svg("svg", { viewBox: "0 0 " + width + " " + height, width, height, id: "state-machine", role: "img" },
    svg("defs", {}, svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 6, markerHeight: 6, orient: "auto-start-reverse" },
      svg("path", { d: "M 0 0 L 10 5 L 0 10 z", class: "arrow-head" }))));
  const seen = new Set();
  for (const e of edges) {
    const a = pos[e.from], b = pos[e.to];
    const key = e.from + ">" + e.to;
    if (!a || !b || seen.has(key) || e.from === e.to) continue;
    seen.add(key);
    drawing.append(svg("line", { x1: a.x + boxW, y1: a.y + boxH / 2, x2: b.x, y2: b.y + boxH / 2, class: "edge", "marker-end": "url(#arrow)" },
      svg("title", {}, e.from + " → " + e.to + ": " + e.on + (e.emits ? " / " + e.emits : ""))));
  }
  for (const [state, p] of Object.entries(pos)) {
    const here = state === current;
    drawing.append(svg("g", { class: "state" + (here ? " current" : ""), "data-state": state },
      svg("rect", { x: p.x, y: p.y, width: boxW, height: boxH, rx: 6 }),
      svg("text", { x: p.x + boxW / 2, y: p.y + boxH / 2 + 4, "text-anchor": "middle" }, state === "[*]" ? "start" : state)));
  }
  return el("div", { class: "scroll machine" }, drawing);
}

async function sagaPage(id) {
  const r = await api("/sagas/" + encodeURIComponent(id));
  if (r.status !== 200) return show(el("h1", {}, "Saga " + id), failure("Not found", r));
  const s = r.body;
  const current = s.status === "COMPENSATING" && s.step_awaited ? "COMPENSATING_" + s.step_awaited.toUpperCase() : s.status;
  const facts = [
    ["status", statusBadge(s.status)],
    ["step awaited", text(s.step_awaited)],
    ["deadline", text(s.deadline)],
    ["awaiting", s.awaiting ? s.awaiting.event_type + " (event " + s.awaiting.event_id + ", attempt " + s.awaiting.attempt + ")" : "-"],
    ["outcome", outcomeText(s.outcome)],
    ["correlation id", text(s.correlation_id)],
    ["partition", text(s.partition)],
    ["topology version", text(s.topology_version)],
    ["started", text(s.started_at)],
    ["updated", text(s.updated_at)],
  ];
  const actions = el("div", { class: "actions" },
    el("button", { id: "action-retry", onclick: () => act(s, "retry") }, "Retry"),
    el("button", { id: "action-cancel", class: "danger", onclick: () => act(s, "cancel") }, "Cancel"),
    el("button", { id: "action-resume", onclick: () => act(s, "resume") }, "Resume"));
  const timeline = (s.history || []).map((t) => [
    text(t.at),
    el("span", { class: t.cause.startsWith("manual_") ? "cause manual" : "cause" }, t.cause),
    text(t.from),
    text(t.to),
    (t.sent || []).join(", ") || "-",
    text(t.source),
    text(t.event_id),
    text(t.note),
  ]);
  show(
    el("h1", {}, "Saga ", el("span", { id: "saga-id" }, s.saga_id)),
    el("div", { class: "facts", id: "saga-facts" }, facts.map(([k, v]) => el("div", {}, el("span", { class: "key" }, k), el("span", { class: "value", id: k === "status" ? "saga-status" : undefined }, v)))),
    actions,
    el("div", { id: "action-result" }),
    el("h2", {}, "State machine"),
    stateMachine(current),
    el("h2", {}, "Timeline"),
    table(["at", "cause", "from", "to", "sent", "input (topic/partition/offset)", "event id", "note"], timeline, "timeline"),
    el("h2", {}, "Context"),
    el("pre", { id: "saga-context" }, JSON.stringify(s.context, null, 2)),
  );
}

function confirmAction(title, textLine, needsReason) {
  return new Promise((resolve) => {
    const dialog = document.getElementById("confirm");
    document.getElementById("confirm-title").textContent = title;
    document.getElementById("confirm-text").textContent = textLine;
    const reason = document.getElementById("confirm-reason");
    reason.value = "";
    reason.required = needsReason;
    reason.parentElement.hidden = !needsReason;
    const by = document.getElementById("confirm-by");
    by.value = sessionStorage.getItem("saga-streams-by") || "";
    const form = document.getElementById("confirm-form");
    form.onsubmit = (e) => {
      e.preventDefault();
      if (needsReason && !reason.value.trim()) {
        reason.focus();
        return;
      }
      sessionStorage.setItem("saga-streams-by", by.value.trim());
      dialog.close();
      resolve({ reason: reason.value.trim(), by: by.value.trim() || "inspector" });
    };
    document.getElementById("confirm-cancel").onclick = () => {
      dialog.close();
      resolve(null);
    };
    dialog.showModal();
  });
}

// The id of an action whose sending was not confirmed: sent again with the same id, it applies
// at most once.
const unconfirmed = {};

function newId() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

async function act(saga, action) {
  const texts = {
    retry: "Send " + (saga.awaiting ? saga.awaiting.event_type : "the awaited message") + " again, with the same event id.",
    cancel: "Compensate what the saga did, in reverse order, and cancel it. This cannot be undone.",
    resume: "Send the compensations that were given up again, with their first event ids.",
  };
  const answer = await confirmAction(action[0].toUpperCase() + action.slice(1) + " saga " + saga.saga_id + "?", texts[action], action === "cancel");
  if (!answer) return;
  const result = document.getElementById("action-result");
  const key = saga.saga_id + "/" + action;
  const actionId = unconfirmed[key] || newId();
  let r;
  try {
    r = await api("/sagas/" + encodeURIComponent(saga.saga_id) + "/" + action, {
      method: "POST",
      body: JSON.stringify({ reason: answer.reason || null, by: answer.by, action_id: actionId }),
    });
  } catch (e) {
    r = { status: 0, body: { error: String(e) } };
  }
  if (r.status !== 202) {
    // Perhaps written all the same: the next try sends the same id.
    if (r.status === 0 || r.status === 503) unconfirmed[key] = actionId;
    result.replaceChildren(failure(action + " not accepted", r));
    return;
  }
  delete unconfirmed[key];
  result.replaceChildren(el("p", { class: "pending" }, action + " sent (action " + r.body.action_id + "); waiting for the saga to take it…"));
  for (let i = 0; i < 150; i++) {
    await new Promise((ok) => setTimeout(ok, 200));
    const s = await api("/sagas/" + encodeURIComponent(saga.saga_id));
    const entry = s.status === 200 && (s.body.history || []).find((t) => t.event_id === r.body.action_id);
    if (entry) {
      await sagaPage(saga.saga_id);
      const refused = entry.refused === true;
      document.getElementById("action-result").replaceChildren(
        el("p", { class: refused ? "error" : "done", id: "action-outcome" }, action + (refused ? " refused: " : " applied: ") + text(entry.note)));
      return;
    }
  }
  result.replaceChildren(el("p", { class: "error" }, "The saga has not shown the action yet; look again in a moment."));
}

async function dlqIndex() {
  const r = await api("/dlq");
  if (r.status !== 200) return show(el("h1", {}, "Dead letters"), failure("Dead letters", r));
  show(el("h1", {}, "Dead letters"),
    table(["topic", "records", "reasons"], r.body.topics.map((t) => [
      el("a", { href: "#/dlq/" + encodeURIComponent(t.topic) }, t.topic), t.total,
      Object.entries(t.reasons).map(([k, v]) => k + ": " + v).join(", ") || "-"]), "dlq-topics"));
}

async function dlqPage(topic, params) {
  const reason = el("input", { id: "dlq-reason", value: params.get("reason") || "", placeholder: "reason" });
  const sagaId = el("input", { id: "dlq-saga", value: params.get("saga_id") || "", placeholder: "saga id" });
  const form = el("form", { class: "filters" }, el("label", {}, "reason", reason), el("label", {}, "saga id", sagaId),
    el("button", { type: "submit", id: "dlq-filter" }, "Filter"));
  form.onsubmit = (e) => {
    e.preventDefault();
    const q = new URLSearchParams();
    if (reason.value.trim()) q.set("reason", reason.value.trim());
    if (sagaId.value.trim()) q.set("saga_id", sagaId.value.trim());
    location.hash = "#/dlq/" + encodeURIComponent(topic) + "?" + q.toString();
  };
  const q = new URLSearchParams();
  for (const f of ["reason", "saga_id"]) if (params.get(f)) q.set(f, params.get(f));
  q.set("limit", "100");
  const r = await api("/dlq/" + encodeURIComponent(topic) + "?" + q.toString());
  const parts = [el("h1", {}, "Dead letters of " + topic), form];
  if (r.status !== 200) {
    parts.push(failure("Reading", r));
    return show(...parts);
  }
  const boxes = [];
  const rows = r.body.records.map((d) => {
    const box = el("input", { type: "checkbox", value: d.position, class: "dlq-pick" });
    boxes.push(box);
    return [box, text(d.position), text(d.at), d.reason, d.source ? d.source.topic + "/" + d.source.partition + "/" + d.source.offset : "-",
      d.saga_id ? sagaLink(d.saga_id) : "-", d.replay_of ? d.replay_of.from + " (#" + d.replay_of.count + ")" : "-",
      el("details", {}, el("summary", {}, d.message || "value"),
        el("pre", { class: "headers" }, d.headers.map((h) => h[0] + ": " + h[1]).join("\n")),
        el("pre", { class: "value" }, (d.value_is_hex ? "(hex) " : "") + d.value + "\n(" + d.value_bytes + " bytes in all; the first 2 KiB shown)"))];
  });
  parts.push(el("p", {}, r.body.matching + " matching; the newest " + r.body.records.length + " shown."));
  parts.push(table(["", "dead letter", "at", "reason", "source", "saga", "replay of", "message, headers and value"], rows, "dlq-table"));
  const result = el("div", { id: "replay-result" });
  const replay = async (dryRun) => {
    const buttons = [document.getElementById("dlq-dry-run"), document.getElementById("dlq-replay")];
    if (buttons.some((b) => b && b.disabled)) return;
    buttons.forEach((b) => { if (b) b.disabled = true; });
    try {
      await replayOnce(dryRun);
    } finally {
      buttons.forEach((b) => { if (b) b.disabled = false; });
    }
  };
  const replayOnce = async (dryRun) => {
    const picked = boxes.filter((b) => b.checked).map((b) => b.value);
    const body = { dry_run: dryRun, by: sessionStorage.getItem("saga-streams-by") || "inspector" };
    if (picked.length) body.positions = picked.join(",");
    else {
      if (params.get("reason")) body.reason = params.get("reason");
      if (params.get("saga_id")) body.saga_id = params.get("saga_id");
    }
    if (!dryRun) {
      const ok = await confirmAction("Replay " + (picked.length || r.body.matching) + " dead letter(s)?", "They are written back to the partitions they were read from.", false);
      if (!ok) return;
      body.by = ok.by;
    }
    const res = await api("/dlq/" + encodeURIComponent(topic) + "/replay", { method: "POST", body: JSON.stringify(body) });
    if (res.status !== 200) return result.replaceChildren(failure("Replay", res));
    result.replaceChildren(
      el("p", { id: "replay-summary" }, (dryRun ? "Dry run: " : "") + res.body.replayed + (dryRun ? " would be replayed, " : " replayed, ") + res.body.skipped + " skipped, " + res.body.failed + " failed"),
      table(["dead letter", "reason", "result"], res.body.results.map((x) => [x.position, x.reason, x.result.outcome + (x.result.detail !== undefined ? ": " + text(x.result.detail) : "")]), "replay-table"));
  };
  parts.push(el("div", { class: "actions" },
    el("button", { id: "dlq-dry-run", onclick: () => replay(true) }, "Replay: dry run"),
    el("button", { id: "dlq-replay", class: "danger", onclick: () => replay(false) }, "Replay")), result);
  show(...parts);
}

async function search(value) {
  const id = value.trim();
  if (!id) return;
  const direct = await api("/sagas/" + encodeURIComponent(id));
  if (direct.status === 200) {
    location.hash = "#/saga/" + encodeURIComponent(id);
    return;
  }
  notice("Looking for correlation id " + id + "…");
  const byCorrelation = await listAll("limit=2&correlation_id=" + encodeURIComponent(id), 2, 100);
  if (byCorrelation.found.length === 1) {
    location.hash = "#/saga/" + encodeURIComponent(byCorrelation.found[0].saga_id);
    return;
  }
  location.hash = "#/sagas?correlation_id=" + encodeURIComponent(id);
}

async function route() {
  notice("");
  const hash = location.hash || "#/";
  const path = hash.split("?")[0];
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", path.startsWith(a.getAttribute("href")) && (a.getAttribute("href") !== "#/" || path === "#/"));
  try {
    if (!topology) {
      const t = await api("/topology");
      if (t.status === 200) {
        topology = t.body;
        document.getElementById("saga-name").textContent = topology.name + " (v" + topology.version + ")";
      }
    }
    if (path === "#/" || path === "") return await overview();
    if (path === "#/sagas") return await sagas(query(hash));
    if (path.startsWith("#/saga/")) return await sagaPage(decodeURIComponent(path.slice("#/saga/".length)));
    if (path === "#/dlq") return await dlqIndex();
    if (path.startsWith("#/dlq/")) return await dlqPage(decodeURIComponent(path.slice("#/dlq/".length)), query(hash));
    show(el("p", {}, "No such page."));
  } catch (e) {
    show(el("p", { class: "error" }, "The instance did not answer: " + e));
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("token-form").onsubmit = (e) => {
    e.preventDefault();
    const input = document.getElementById("token");
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    input.value = "";
    input.placeholder = "token set";
    topology = null;
    route();
  };
  if (token()) document.getElementById("token").placeholder = "token set";
  document.getElementById("search-form").onsubmit = (e) => {
    e.preventDefault();
    search(document.getElementById("search").value);
  };
  window.addEventListener("hashchange", route);
  route();
});
