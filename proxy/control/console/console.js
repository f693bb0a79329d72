// egress-warden admin console. Every value that comes from the API (and so possibly from an
// agent: hosts, sessions, notes, justifications) is put on the page with textContent or as an
// attribute value, never parsed as HTML.
"use strict";

(function () {
  const TOKEN_KEY = "egress-warden.token";
  const SCOPES = ["once", "session", "always"];
  const state = {
    token: sessionStorage.getItem(TOKEN_KEY) || "",
    role: null,
    name: null,
    pending: [],
    selected: 0,
    scope: "once",
    view: "queue",
    stream: null,
    choices: new Map(), // item id -> {scope, for} the user picked (kept across re-renders)
    linked: null, // the item id of a #pending/<id> link already selected
  };

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "text") node.textContent = String(value);
      else if (key === "class") node.className = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "text") node.textContent = String(value);
      else node.setAttribute(key, String(value));
    }
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  function duration(seconds) {
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return s + "s";
    const m = Math.floor(s / 60);
    if (m < 60) return m + "m" + String(s % 60).padStart(2, "0") + "s";
    const h = Math.floor(m / 60);
    if (h < 24) return h + "h" + String(m % 60).padStart(2, "0") + "m";
    return Math.floor(h / 24) + "d" + String(h % 24).padStart(2, "0") + "h";
  }

  function clock(at) {
    return typeof at === "number" ? new Date(at * 1000).toLocaleTimeString() : "-";
  }

  function now() {
    return Date.now() / 1000;
  }

  function canDecide() {
    return state.role === "approver" || state.role === "admin";
  }

  // -- the API -----------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, detail) {
      super(detail || code || "HTTP " + status);
      this.status = status;
      this.code = code;
    }
  }

  async function api(method, path, body) {
    const headers = { Authorization: "Bearer " + state.token, Accept: "application/json" };
    const init = { method, headers, cache: "no-store", credentials: "omit" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      throw new ApiError(0, "unreachable", "cannot reach the control API");
    }
    let data = null;
    try {
      data = await response.json();
    } catch (err) {
      data = null;
    }
    if (!response.ok) {
      const code = data && typeof data.error === "string" ? data.error : "";
      const detail = data && typeof data.detail === "string" ? data.detail : response.statusText;
      throw new ApiError(response.status, code, detail);
    }
    return data;
  }

  function showError(err) {
    if (err instanceof ApiError && (err.status === 401 || (err.status === 403 && err.code === "forbidden"))) {
      signOut("Your token is no longer accepted; sign in again.");
      return;
    }
    let text = err && err.message ? err.message : String(err);
    if (err instanceof ApiError && err.code && err.code.endsWith("role_required")) {
      text = "Not allowed for your role (" + (state.role || "?") + "): " + text;
    }
    $("error").textContent = text;
  }

  function status(text) {
    $("status").textContent = text;
  }

  // -- sign in -------------------------------------------------------------------------------

  async function signIn(token) {
    state.token = token;
    const me = await api("GET", "/v1/whoami");
    state.name = me.name;
    state.role = me.role;
    sessionStorage.setItem(TOKEN_KEY, token);
    $("sign-in").hidden = true;
    $("app").hidden = false;
    $("sign-out").hidden = false;
    $("who").textContent = "Signed in as " + me.name + " (" + me.role + ")";
    $("error").textContent = "";
    select("queue");
    await refreshPending();
    startStream();
  }

  function signOut(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    state.token = "";
    state.role = null;
    if (state.stream) state.stream.abort();
    state.stream = null;
    $("app").hidden = true;
    $("sign-out").hidden = true;
    $("sign-in").hidden = false;
    $("who").textContent = "";
    $("sign-in-error").textContent = message || "";
    $("token").value = "";
    $("token").focus();
  }

  async function onSignIn(event) {
    event.preventDefault();
    const token = $("token").value.trim();
    const error = $("sign-in-error");
    error.textContent = "";
    if (!token) {
      error.textContent = "Enter a control token.";
      $("token").focus();
      return;
    }
    try {
      await signIn(token);
    } catch (err) {
      state.token = "";
      if (err instanceof ApiError && (err.status === 401 || err.status === 403)) {
        error.textContent = "Sign-in failed: this token is not accepted by the control API.";
      } else if (err instanceof ApiError && err.status === 421) {
        error.textContent = "Sign-in failed: this address is not one the control API serves (" + err.message + ").";
      } else {
        error.textContent = "Sign-in failed: " + (err && err.message ? err.message : String(err));
      }
      $("token").focus();
    }
  }

  // -- views ---------------------------------------------------------------------------------

  const VIEWS = ["queue", "grants", "sessions", "decisions", "dashboard"];

  function select(view) {
    state.view = view;
    for (const name of VIEWS) {
      const on = name === view;
      $("tab-" + name).setAttribute("aria-selected", on ? "true" : "false");
      $("tab-" + name).tabIndex = on ? 0 : -1;
      $("view-" + name).hidden = !on;
    }
    $("error").textContent = "";
    const load = {
      queue: refreshPending,
      grants: refreshGrants,
      sessions: refreshSessions,
      decisions: refreshDecisions,
      dashboard: refreshDashboard,
    }[view];
    load().catch(showError);
  }

  // -- the queue -------------------------------------------------------------------------------

  async function refreshPending() {
    state.pending = await api("GET", "/v1/pending");
    const linked = linkedItem();
    const index = linked ? state.pending.findIndex((item) => item.id === linked) : -1;
    if (index >= 0) {
      state.selected = index;
    } else if (linked) {
      status("Item " + linked + " is no longer pending (decided or expired).");
    }
    if (linked) state.linked = linked; // acted on once; from there the user moves on
    renderQueue();
    if (index >= 0) {
      const node = $("queue").children[index];
      if (node) node.scrollIntoView({ block: "center" });
    }
  }

  // A notification links to /#pending/<id> (docs/notifications.md): select that item.
  function linkedItem() {
    const match = /^#pending\/([0-9A-Za-z_-]{1,64})$/.exec(location.hash);
    return match && match[1] !== state.linked ? match[1] : null;
  }

  function renderQueue() {
    const list = $("queue");
    const focusedId = document.activeElement && document.activeElement.dataset
      ? document.activeElement.dataset.focusKey : null;
    clear(list);
    $("queue-count").textContent = String(state.pending.length);
    $("queue-empty").hidden = state.pending.length > 0;
    if (state.selected >= state.pending.length) state.selected = Math.max(0, state.pending.length - 1);
    state.pending.forEach((item, index) => list.append(queueItem(item, index)));
    if (focusedId) {
      const again = list.querySelector('[data-focus-key="' + CSS.escape(focusedId) + '"]');
      if (again) again.focus();
    }
  }

  function queueItem(item, index) {
    const t = now();
    const dest = item.scheme + "://" + item.host + ":" + item.port;
    const id = item.id;
    const choice = state.choices.get(id) || { scope: state.scope, for: item.agent ? "agent" : "all" };
    const remember = () => state.choices.set(id, { scope: scopeSel.value, for: forSel.value });
    const scopeSel = el("select", {
      "data-focus-key": id + ":scope", "aria-label": "Scope for " + item.host, onchange: remember,
    });
    for (const scope of SCOPES) scopeSel.append(el("option", { value: scope, text: scope, selected: scope === choice.scope }));
    const forSel = el("select", {
      "data-focus-key": id + ":for", "aria-label": "For whom, " + item.host, onchange: remember,
    });
    forSel.append(el("option", { value: "agent", text: "this agent", selected: choice.for === "agent" }));
    forSel.append(el("option", { value: "all", text: "all agents", selected: choice.for === "all" }));
    if (!item.agent) forSel.disabled = true;
    const decide = (action) => () => resolve(item, action, scopeSel.value, forSel.value);
    const approve = el("button", {
      type: "button", class: "approve", "data-focus-key": id + ":approve",
      text: "Approve", "aria-label": "Approve " + dest, onclick: decide("approve"),
    });
    const deny = el("button", {
      type: "button", class: "deny", "data-focus-key": id + ":deny",
      text: "Deny", "aria-label": "Deny " + dest, onclick: decide("deny"),
    });
    if (!canDecide()) {
      approve.disabled = true;
      deny.disabled = true;
    }
    const details = el("dl", {});
    const add = (label, value) => {
      if (value === null || value === undefined || value === "") return;
      details.append(el("dt", { text: label }), el("dd", { text: value }));
    };
    add("Method", item.method);
    add("Agent", item.agent || "(anonymous)");
    add("Session", item.session);
    add("Waiting", String(item.waiting) + " request(s), " + String(item.count) + " seen");
    add("Age", duration(t - item.first_seen));
    add("Time left", duration(item.expires_at - t));
    add("Justification", item.justification);
    if (item.review) add("Review", reviewText(item.review));
    return el(
      "li",
      {
        class: "item" + (index === state.selected ? " selected" : ""),
        "data-id": id,
        "aria-current": index === state.selected ? "true" : null,
      },
      el("p", { class: "dest", text: dest }),
      details,
      el(
        "div",
        { class: "controls" },
        el("label", {}, "Scope", scopeSel),
        el("label", {}, "For", forSel),
        approve,
        deny,
      ),
    );
  }

  function reviewText(review) {
    if (typeof review === "string") return review;
    const parts = [];
    for (const key of ["verdict", "reviewer", "rationale", "reason"]) {
      if (review[key]) parts.push(key + ": " + String(review[key]));
    }
    if (Array.isArray(review.signals) && review.signals.length) parts.push("signals: " + review.signals.map(String).join(", "));
    return parts.join("; ") || JSON.stringify(review);
  }

  async function resolve(item, action, scope, grantFor) {
    $("error").textContent = "";
    const body = { scope };
    if (item.agent) body.for = grantFor;
    try {
      const answer = await api("POST", "/v1/pending/" + encodeURIComponent(item.id) + "/" + action, body);
      status((action === "approve" ? "Approved " : "Denied ") + item.host + ":" + item.port + " (" +
        answer.scope + ", for " + answer["for"] + "), released " + answer.released + ".");
    } catch (err) {
      showError(err);
    }
    await refreshPending().catch(showError);
  }

  // -- live events over fetch() (EventSource cannot send the Authorization header) ----------

  function startStream() {
    if (state.stream) state.stream.abort();
    const controller = new AbortController();
    state.stream = controller;
    const live = $("live");
    const run = async () => {
      while (!controller.signal.aborted) {
        try {
          const response = await fetch("/v1/events", {
            headers: { Authorization: "Bearer " + state.token, Accept: "text/event-stream" },
            cache: "no-store",
            credentials: "omit",
            signal: controller.signal,
          });
          if (response.status === 401 || response.status === 403) {
            signOut("Your token is no longer accepted; sign in again.");
            return;
          }
          if (!response.ok || !response.body) throw new Error("HTTP " + response.status);
          await readEvents(response.body.getReader(), async () => {
            // The server subscribes as it sends its first line: read the queue only then, so
            // nothing held in between is missed.
            live.textContent = "live";
            live.className = "live on";
            await refreshPending().catch(showError);
          });
        } catch (err) {
          if (controller.signal.aborted) return;
        }
        live.textContent = "reconnecting…";
        live.className = "live off";
        await new Promise((r) => setTimeout(r, 2000));
      }
    };
    run();
  }

  async function readEvents(reader, opened) {
    const decoder = new TextDecoder();
    let buffer = "";
    let first = true;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      if (first) {
        first = false;
        await opened();
      }
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let kind = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) kind = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).trim());
        }
        if (data.length) onEvent(kind, data.join("\n"));
      }
    }
  }

  let pendingRefresh = null;
  function onEvent(kind, _data) {
    if (kind === "pending" || kind === "resolved") {
      if (pendingRefresh) return;
      pendingRefresh = setTimeout(() => {
        pendingRefresh = null;
        refreshPending().catch(showError);
      }, 50);
    } else if ((kind === "grant_added" || kind === "grant_revoked") && state.view === "grants") {
      refreshGrants().catch(showError);
    } else if (kind === "session_ended" && state.view === "sessions") {
      refreshSessions().catch(showError);
    }
  }

  // -- grants ----------------------------------------------------------------------------------

  let grants = [];

  async function refreshGrants() {
    grants = await api("GET", "/v1/grants");
    renderGrants();
  }

  function renderGrants() {
    const filter = $("grants-filter").value.trim().toLowerCase();
    const body = $("grants").tBodies[0];
    clear(body);
    const t = now();
    const shown = grants.filter((g) =>
      !filter || [g.pattern, g.agent, g.session, g.created_by, g.note]
        .some((v) => typeof v === "string" && v.toLowerCase().includes(filter)));
    if (!shown.length) body.append(el("tr", {}, el("td", { colspan: 7, text: "No grants." })));
    for (const g of shown) {
      const revoke = el("button", {
        type: "button", class: "secondary", text: "Revoke", "aria-label": "Revoke " + g.pattern,
        onclick: async () => {
          try {
            await api("DELETE", "/v1/grants/" + encodeURIComponent(g.id));
            status("Revoked the grant for " + g.pattern + ".");
          } catch (err) {
            showError(err);
          }
          await refreshGrants().catch(showError);
        },
      });
      if (!canDecide()) revoke.disabled = true;
      const who = g.agent ? g.agent + (g.session ? "~" + g.session : "") : "all agents";
      const expires = typeof g.expires_at === "number" ? "in " + duration(g.expires_at - t) : "never";
      body.append(el("tr", { "data-grant": g.id },
        el("td", { text: g.pattern }), el("td", { text: g.action }), el("td", { text: g.scope }),
        el("td", { text: who }), el("td", { text: g.created_by }), el("td", { text: expires }),
        el("td", {}, revoke)));
    }
  }

  // -- sessions --------------------------------------------------------------------------------

  async function refreshSessions() {
    const sessions = await api("GET", "/v1/sessions");
    const body = $("sessions").tBodies[0];
    clear(body);
    if (!sessions.length) body.append(el("tr", {}, el("td", { colspan: 7, text: "No sessions." })));
    const t = now();
    for (const s of sessions) {
      const end = el("button", {
        type: "button", class: "secondary", text: "End", "aria-label": "End session " + s.agent + "~" + s.session,
        onclick: async () => {
          try {
            const answer = await api("POST", "/v1/sessions/" + encodeURIComponent(s.agent) + "/" +
              encodeURIComponent(s.session) + "/end");
            status("Ended " + s.agent + "~" + s.session + ": " + answer.revoked.length + " session grant(s) revoked.");
          } catch (err) {
            showError(err);
          }
          await refreshSessions().catch(showError);
        },
      });
      if (!canDecide()) end.disabled = true;
      body.append(el("tr", {},
        el("td", { text: s.agent }), el("td", { text: s.session }),
        el("td", { text: clock(s.first_seen) }),
        el("td", { text: typeof s.last_seen === "number" ? duration(t - s.last_seen) + " ago" : "-" }),
        el("td", { text: String(s.requests) }),
        el("td", { text: s.grants.map((g) => g.pattern).join(", ") || "-" }),
        el("td", {}, end)));
    }
  }

  // -- decisions -------------------------------------------------------------------------------

  async function refreshDecisions() {
    const form = $("decision-filters");
    const params = new URLSearchParams({ limit: "200" });
    for (const name of ["agent", "host", "decision", "reason"]) {
      const value = form.elements[name].value.trim();
      if (value) params.set(name, value);
    }
    const rows = await api("GET", "/v1/decisions?" + params.toString());
    const body = $("decisions").tBodies[0];
    clear(body);
    if (!rows.length) body.append(el("tr", {}, el("td", { colspan: 7, text: "No decisions match." })));
    for (const r of rows) {
      body.append(el("tr", {},
        el("td", { text: clock(r.at) }),
        el("td", { class: "d-" + r.decision, text: r.decision }),
        el("td", { text: r.reason }),
        el("td", { text: r.method + " " + r.host + ":" + r.port + (r.path ? r.path : "") }),
        el("td", { text: (r.agent || "(anonymous)") + (r.session ? "~" + r.session : "") }),
        el("td", { text: r.rule || "-" }),
        el("td", { text: r.source || "-" })));
    }
  }

  // -- dashboard -------------------------------------------------------------------------------

  function top(rows, key, limit) {
    const counts = new Map();
    for (const r of rows) {
      const k = key(r);
      if (k) counts.set(k, (counts.get(k) || 0) + 1);
    }
    return [...counts.entries()].sort((a, b) => b[1] - a[1]).slice(0, limit || 5);
  }

  function fillTop(id, entries) {
    const list = $(id);
    clear(list);
    if (!entries.length) list.append(el("li", { text: "none" }));
    for (const [name, count] of entries) list.append(el("li", { text: name + " — " + count }));
  }

  async function refreshDashboard() {
    const rows = await api("GET", "/v1/decisions?since=1h&limit=1000");
    const t = now();
    const buckets = 12;
    const width = 5 * 60;
    const counts = Array.from({ length: buckets }, () => ({ allow: 0, hold: 0, deny: 0 }));
    for (const r of rows) {
      const index = buckets - 1 - Math.floor((t - r.at) / width);
      if (index >= 0 && index < buckets && r.decision in counts[index]) counts[index][r.decision] += 1;
    }
    const most = Math.max(1, ...counts.map((c) => c.allow + c.hold + c.deny));
    const W = 1000, H = 240, pad = 24, bar = (W - pad) / buckets;
    const chart = svg("svg", { viewBox: "0 0 " + W + " " + H, role: "img", "aria-labelledby": "chart-caption" });
    counts.forEach((c, i) => {
      let y = H - pad;
      for (const kind of ["allow", "hold", "deny"]) {
        const h = ((H - 2 * pad) * c[kind]) / most;
        if (h > 0) {
          y -= h;
          const rect = svg("rect", { x: pad + i * bar + 2, y, width: bar - 4, height: h, class: kind });
          rect.append(svg("title", { text: c[kind] + " " + kind }));
          chart.append(rect);
        }
      }
      const minutes = (buckets - i) * 5;
      if (i % 3 === 0) chart.append(svg("text", { x: pad + i * bar + 2, y: H - 5, text: "-" + minutes + "m" }));
    });
    chart.append(svg("text", { x: 2, y: 12, text: "max " + most }));
    clear($("chart"));
    $("chart").append(chart);
    const dest = (r) => r.host + ":" + r.port;
    fillTop("top-denied", top(rows.filter((r) => r.decision === "deny"), dest));
    fillTop("top-held", top(rows.filter((r) => r.decision === "hold"), dest));
    fillTop("top-agents", top(rows, (r) => r.agent || "(anonymous)"));
    const held = rows.filter((r) => r.decision === "hold").length;
    $("held-summary").textContent = held + " of " + rows.length + " requests held in the last hour; " +
      state.pending.length + " item(s) waiting now.";
    $("chart-caption").textContent = "Decisions per 5 minutes over the last hour: " +
      rows.filter((r) => r.decision === "allow").length + " allowed (green), " + held + " held (amber), " +
      rows.filter((r) => r.decision === "deny").length + " denied (red).";
  }

  // -- keyboard --------------------------------------------------------------------------------

  function onKey(event) {
    if ($("app").hidden || event.altKey || event.ctrlKey || event.metaKey) return;
    const target = event.target;
    if (target && (target.tagName === "INPUT" || target.tagName === "SELECT" || target.tagName === "TEXTAREA")) return;
    const key = event.key;
    if (key === "?") {
      select("queue");
      $("status").textContent = "Keys: j/k move, a approve, d deny, 1/2/3 scope once/session/always.";
      return;
    }
    if (state.view !== "queue" || !state.pending.length) return;
    const item = state.pending[state.selected];
    if (key === "j" || key === "k") {
      state.selected = Math.min(state.pending.length - 1, Math.max(0, state.selected + (key === "j" ? 1 : -1)));
      renderQueue();
      const node = $("queue").children[state.selected];
      if (node) node.querySelector("button.approve").focus();
    } else if (key === "1" || key === "2" || key === "3") {
      state.scope = SCOPES[Number(key) - 1];
      state.choices.clear();
      renderQueue();
      status("Scope: " + state.scope);
    } else if ((key === "a" || key === "d") && item) {
      event.preventDefault();
      if (!canDecide()) {
        showError(new ApiError(403, "approver_role_required", "deciding needs the approver role"));
        return;
      }
      const node = $("queue").children[state.selected];
      const selects = node ? node.querySelectorAll("select") : [];
      const scope = selects[0] ? selects[0].value : state.scope;
      const grantFor = selects[1] ? selects[1].value : "agent";
      resolve(item, key === "a" ? "approve" : "deny", scope, grantFor);
    }
  }

  function onTabKey(event) {
    const index = VIEWS.indexOf(state.view);
    let next = null;
    if (event.key === "ArrowRight") next = VIEWS[(index + 1) % VIEWS.length];
    else if (event.key === "ArrowLeft") next = VIEWS[(index + VIEWS.length - 1) % VIEWS.length];
    if (next) {
      event.preventDefault();
      select(next);
      $("tab-" + next).focus();
    }
  }

  // -- start -----------------------------------------------------------------------------------

  function start() {
    $("sign-in-form").addEventListener("submit", onSignIn);
    $("sign-out").addEventListener("click", () => signOut(""));
    for (const name of VIEWS) {
      $("tab-" + name).addEventListener("click", () => select(name));
      $("tab-" + name).addEventListener("keydown", onTabKey);
    }
    $("grants-filter").addEventListener("input", renderGrants);
    $("decision-filters").addEventListener("submit", (event) => {
      event.preventDefault();
      refreshDecisions().catch(showError);
    });
    document.addEventListener("keydown", onKey);
    window.addEventListener("hashchange", () => {
      if (!$("app").hidden) select("queue");
    });
    setInterval(() => {
      if (!$("app").hidden && state.view === "queue") renderQueue();
    }, 5000);
    if (state.token) {
      signIn(state.token).catch(() => signOut("Your saved token is no longer accepted; sign in again."));
    } else {
      $("token").focus();
    }
  }

  start();
})();
