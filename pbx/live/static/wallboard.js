// The wallboard: signs in with the admin token (kept in this tab's
// sessionStorage only), trades it for a single-use ticket and follows the
// queues over the event WebSocket. Each "wallboard" message replaces the
// whole picture; agent and caller events in between are applied at once.
// Waits and times in state tick here each second, counted on the server's
// clock (its "now" and each event's "time"), not this machine's.
// Everything from the server is written as text, never as HTML: caller ids
// come from whoever calls.
"use strict";

(() => {
  const TOKEN_KEY = "pbx.wallboard.token";
  const TYPES = "wallboard,agent.state,queue.joined,queue.left";
  const FIRST_RETRY_MS = 1000;
  const LAST_RETRY_MS = 30000;
  const SILENCE_MS = 15000; // three board refreshes without a word: the connection is gone
  const STATE_LABELS = {
    logged_out: "logged out", available: "available", ringing: "ringing", busy: "on a call",
    wrapup: "wrap-up", paused: "paused", dnd: "do not disturb",
  };

  class Refused extends Error {}

  const $ = (id) => document.getElementById(id);
  const queues = new Map(); // name -> {name, callers: [{id, caller, callback, joinedMs}], agents: Map ext -> {state, sinceMs}, stats, voicemail}
  let anchor = null; // {serverMs, at}: the server's clock at performance.now() == at
  let socket = null;
  let retryMs = FIRST_RETRY_MS;
  let retryTimer = null;
  let heardAt = 0;

  const serverMs = () => (anchor ? anchor.serverMs + (performance.now() - anchor.at) : Date.now());

  function setStatus(status, text) {
    document.body.dataset.status = status;
    $("status").textContent = text;
  }

  function duration(seconds) {
    const s = Math.max(0, Math.floor(seconds));
    const h = Math.floor(s / 3600);
    const m = Math.floor((s % 3600) / 60);
    const ss = String(s % 60).padStart(2, "0");
    return h ? `${h}:${String(m).padStart(2, "0")}:${ss}` : `${m}:${ss}`;
  }

  // --- signing in and the connection ---

  async function fetchTicket(token) {
    const response = await fetch("/api/tickets", { method: "POST", headers: { Authorization: `Bearer ${token}` } });
    if (response.status === 401) throw new Refused("refused");
    if (!response.ok) throw new Error(`the server answered ${response.status}`);
    return (await response.json()).ticket;
  }

  function stopConnection() {
    clearTimeout(retryTimer);
    retryTimer = null;
    if (socket) {
      const old = socket;
      socket = null;
      old.close();
    }
  }

  function showLogin(message) {
    stopConnection();
    queues.clear();
    $("queues").replaceChildren();
    $("login").hidden = false;
    $("sign-out").hidden = true;
    const error = $("login-error");
    error.textContent = message || "";
    error.hidden = !message;
    setStatus("login", "signed out");
    $("token").focus();
  }

  function connect(ticket) {
    $("login").hidden = true;
    $("sign-out").hidden = !sessionStorage.getItem(TOKEN_KEY);
    setStatus("connecting", "connecting");
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(`${scheme}//${location.host}/api/events?types=${TYPES}&ticket=${encodeURIComponent(ticket)}`);
    socket = ws;
    heardAt = performance.now();
    ws.onmessage = (message) => {
      if (socket !== ws) return;
      heardAt = performance.now();
      receive(JSON.parse(message.data));
    };
    ws.onclose = () => {
      if (socket !== ws) return;
      socket = null;
      reconnect();
    };
  }

  // A refused ticket and a lost connection look the same from here (the
  // browser hides the 401): either way a fresh ticket is asked for, which
  // tells a wrong token from a server that is away.
  function reconnect() {
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (!token) {
      showLogin(queues.size ? "The connection closed: sign in to reconnect." : "This link's ticket is used or expired: sign in.");
      return;
    }
    const wait = retryMs * (0.8 + 0.4 * Math.random());
    setStatus("reconnecting", `reconnecting in ${Math.ceil(wait / 1000)} s`);
    retryMs = Math.min(retryMs * 2, LAST_RETRY_MS);
    retryTimer = setTimeout(async () => {
      retryTimer = null;
      try {
        connect(await fetchTicket(token));
      } catch (error) {
        if (error instanceof Refused) {
          sessionStorage.removeItem(TOKEN_KEY);
          showLogin("The token was refused: it may have changed.");
        } else {
          reconnect();
        }
      }
    }, wait);
  }

  async function signIn(event) {
    event.preventDefault();
    const input = $("token");
    const token = input.value.trim();
    try {
      const ticket = await fetchTicket(token);
      sessionStorage.setItem(TOKEN_KEY, token);
      input.value = "";
      retryMs = FIRST_RETRY_MS;
      connect(ticket);
    } catch (error) {
      showLogin(error instanceof Refused ? "Wrong token." : `Cannot reach the server: ${error.message}`);
    }
  }

  // --- what the server says ---

  function receive(message) {
    const time = Date.parse(message.type === "wallboard" ? message.now : message.time);
    if (!Number.isNaN(time)) anchor = { serverMs: time, at: performance.now() };
    if (message.type === "wallboard") {
      retryMs = FIRST_RETRY_MS;
      setStatus("live", "live");
      takeBoard(message.queues, time);
    } else if (message.type === "agent.state") {
      const queue = queues.get(message.queue);
      if (!queue) return;
      const since = typeof message.since === "number" ? message.since * 1000 : Date.parse(message.since);
      queue.agents.set(message.agent, { state: message.state, sinceMs: Number.isNaN(since) ? null : since });
      render();
    } else if (message.type === "queue.joined") {
      const queue = queues.get(message.queue);
      if (!queue || queue.callers.some((c) => c.id === message.call_id)) return;
      queue.callers.push({ id: message.call_id, caller: message.caller || "", callback: false, joinedMs: time });
      render();
    } else if (message.type === "queue.left" && message.outcome !== "callback") {
      // A callback keeps its place under a callback's id: the next board shows it.
      const queue = queues.get(message.queue);
      if (!queue) return;
      queue.callers = queue.callers.filter((c) => c.id !== message.call_id);
      render();
    }
  }

  function takeBoard(list, nowMs) {
    queues.clear();
    for (const q of list) {
      queues.set(q.name, {
        name: q.name,
        callers: q.callers.map((c) => ({ id: c.id, caller: c.caller, callback: c.callback, joinedMs: nowMs - c.wait * 1000 })),
        agents: new Map(q.agents.map((a) => [a.extension, { state: a.state, sinceMs: a.since ? Date.parse(a.since) : null }])),
        stats: q.stats,
        voicemail: "voicemail_pending" in q ? { pending: q.voicemail_pending, overdue: q.voicemail_overdue || 0 } : null,
      });
    }
    render();
  }

  // --- the page ---

  function figure(section, name, text, { alert = false, title = "" } = {}) {
    const box = section.querySelector(`[data-figure="${name}"]`);
    box.hidden = text === null;
    box.dataset.alert = String(alert);
    box.title = title;
    box.querySelector("dd").textContent = text ?? "";
  }

  function percent(part, whole) {
    return whole ? `${Math.round((100 * part) / whole)}%` : "—";
  }

  function item(className, text) {
    const span = document.createElement("span");
    span.className = className;
    span.textContent = text;
    return span;
  }

  function renderQueue(section, queue) {
    section.querySelector(".queue-name").textContent = queue.name;
    const stats = queue.stats;
    const waiting = queue.callers.filter((c) => !c.callback);
    figure(section, "waiting", String(waiting.length));
    figure(section, "service-level",
      stats.service_level === null ? "—" : `${Math.round(stats.service_level * 100)}% ≤ ${stats.service_level_seconds} s`,
      { title: `answered within ${stats.service_level_seconds} s, of ${stats.answered} answered today` });
    figure(section, "average-speed-of-answer", stats.average_speed_of_answer === null ? "—" : duration(stats.average_speed_of_answer));
    figure(section, "abandoned", percent(stats.abandoned, stats.offered), { title: `${stats.abandoned} of ${stats.offered} offered today` });
    figure(section, "callbacks", String(queue.callers.length - waiting.length));
    if ("csat" in stats) {
      figure(section, "csat", stats.csat === null ? "—" : `${stats.csat.toFixed(1)} / 5`, { title: `${stats.surveys ?? 0} surveys today` });
    } else {
      figure(section, "csat", null);
    }
    if (queue.voicemail) {
      const { pending, overdue } = queue.voicemail;
      figure(section, "voicemail", overdue ? `${pending} (${overdue} overdue)` : String(pending), { alert: overdue > 0 });
    } else {
      figure(section, "voicemail", null);
    }
    keyed(section.querySelector(".callers"), "caller", queue.callers.map((c) => [c.id, c]), (li, c) => {
      li.dataset.callback = String(c.callback);
      li.dataset.joined = String(c.joinedMs);
      li.querySelector(".who").textContent = c.caller || "unknown";
    }, ["who", "wait"]);
    keyed(section.querySelector(".agents"), "agent", [...queue.agents], (li, agent, extension) => {
      li.querySelector(".ext").textContent = extension;
      li.dataset.state = agent.state;
      if (agent.sinceMs === null) delete li.dataset.since;
      else li.dataset.since = String(agent.sinceMs);
      li.querySelector(".state").textContent = STATE_LABELS[agent.state] || agent.state;
    }, ["ext", "state", "timer"]);
  }

  // The list's items in the order of ``entries`` ([key, value]): an item
  // already shown is kept (moved, updated), so the page does not flicker
  // and what a reader or a test holds stays on the page.
  function keyed(list, attribute, entries, update, parts) {
    const shown = new Map([...list.children].map((li) => [li.dataset[attribute], li]));
    list.replaceChildren(...entries.map(([key, value]) => {
      let li = shown.get(key);
      if (!li) {
        li = document.createElement("li");
        li.dataset[attribute] = key;
        li.append(...parts.map((part) => item(part, "")));
      }
      update(li, value, key);
      return li;
    }));
  }

  function render() {
    const main = $("queues");
    const template = $("queue-template");
    const sections = new Map([...main.children].map((s) => [s.dataset.queue, s]));
    const wanted = [];
    for (const queue of queues.values()) {
      let section = sections.get(queue.name);
      if (!section) {
        section = template.content.firstElementChild.cloneNode(true);
        section.dataset.queue = queue.name;
      }
      renderQueue(section, queue);
      wanted.push(section);
    }
    main.replaceChildren(...wanted);
    tick();
  }

  function tick() {
    const now = serverMs();
    if (anchor) $("clock").textContent = new Date(now).toLocaleTimeString();
    for (const section of $("queues").children) {
      let longest = 0;
      for (const li of section.querySelectorAll("[data-caller]")) {
        const wait = (now - Number(li.dataset.joined)) / 1000;
        li.querySelector(".wait").textContent = duration(wait);
        if (li.dataset.callback !== "true") longest = Math.max(longest, wait);
      }
      for (const li of section.querySelectorAll("[data-agent]")) {
        li.querySelector(".timer").textContent = li.dataset.since ? duration((now - Number(li.dataset.since)) / 1000) : "";
      }
      const queue = queues.get(section.dataset.queue);
      if (queue) figure(section, "longest-wait", duration(Math.max(queue.stats.longest_wait, longest)));
    }
    if (socket && performance.now() - heardAt > SILENCE_MS) {
      const gone = socket;
      socket = null;
      gone.close();
      reconnect();
    }
  }

  // --- start ---

  function start() {
    $("login").addEventListener("submit", signIn);
    $("sign-out").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      showLogin("");
    });
    setInterval(tick, 1000);
    // A TV handed /wallboard#ticket=... connects with it once; the ticket
    // leaves the address bar at once (it is spent by then anyway).
    const ticket = new URLSearchParams(location.hash.slice(1)).get("ticket");
    if (ticket) {
      history.replaceState(null, "", location.pathname + location.search);
      connect(ticket);
      return;
    }
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (!token) {
      showLogin("");
      return;
    }
    fetchTicket(token).then(connect, (error) => {
      if (error instanceof Refused) {
        sessionStorage.removeItem(TOKEN_KEY);
        showLogin("The token was refused: it may have changed.");
      } else {
        reconnect(); // a server restarting under a TV's reload
      }
    });
  }

  start();
})();
