// @ts-check
/**
 * Wiring: server messages -> ChatState -> View/Panel, and user actions -> requests.
 *
 * Every write carries the revision of the latest snapshot; when the server says it is stale it has
 * already sent the current snapshot, which replaces ours (the server's copy always wins). After a
 * reconnect (e.g. a server restart) the page re-reads the session list and the open session.
 */
import { Panel } from "./panel.js";
import { ChatState } from "./state.js";
import { ProtocolError, Transport } from "./transport.js";
import { View } from "./view.js";

const SESSION_ID_RE = /^[0-9a-f]{32}$/;
const THEME_KEY = "exllama.theme";

const body = document.body;
const state = new ChatState();
const transport = new Transport(body.dataset.wsUrl || "/ws");
try {
  state.model = JSON.parse(body.dataset.model || "null");
} catch { /* the hello brings it */ }

/** @type {Record<string, any> | null} session.update changes not sent yet (e.g. while generating) */
let pendingChanges = null;
let flushing = false;

// ---- requests ------------------------------------------------------------------------------------

/**
 * Send a request; failures become a toast (and resolve to null).
 * @param {string} type @param {Record<string, any>} [fields] @param {{onMessage?: (m: any) => void, quiet?: string[]}} [opts]
 */
async function call(type, fields = {}, opts = {}) {
  try {
    return await transport.request(type, fields, { onMessage: opts.onMessage });
  } catch (e) {
    if (!(e instanceof ProtocolError)) throw e;
    if (!opts.quiet?.includes(e.code)) report(e);
    return null;
  }
}

/** @param {ProtocolError} e */
function report(e) {
  if (e.code === "stale_revision") {
    view.toast("This session was changed elsewhere (another tab?). It has been reloaded; please try again.", { kind: "info" });
  } else if (e.code === "busy") {
    view.toast("The session is busy generating. Stop it first (Esc).", { kind: "info" });
  } else if (e.code === "disconnected") {
    view.toast("Not connected to the server. Reconnecting…");
  } else {
    view.toast(e.message || e.code);
  }
}

/** The gate the next session write waits for. */
let writeTail = Promise.resolve();

/**
 * A session write, carrying the revision of the latest snapshot. Writes go out one at a time, each
 * after the previous one's state arrived: a slider moved just before Enter would otherwise send two
 * requests with the same revision, and the server would rightly refuse the second as stale.
 * @param {string} type @param {Record<string, any>} fields
 * @returns {Promise<any>} the reply (rejects with ProtocolError)
 */
function serialWrite(type, fields) {
  /** @type {() => void} */
  let open = () => {};
  const gate = new Promise((r) => { open = () => r(undefined); });
  const prev = writeTail;
  writeTail = gate;
  return prev.then(() => {
    const s = state.session;
    if (!s) {
      open();
      throw new ProtocolError({ code: "no_session", message: "no session is open" });
    }
    // The state is applied before this promise's continuations run (same frame, then microtasks).
    const p = transport.request(type, { session: s.id, revision: s.revision, ...fields },
      { onMessage: (m) => { if (m.type === "state") open(); } });
    p.then(open, open);
    return p;
  });
}

/**
 * Run `fn` in the write queue: later writes wait until it has finished.
 * @template T @param {() => Promise<T>} fn @returns {Promise<T>}
 */
function exclusive(fn) {
  /** @type {() => void} */
  let open = () => {};
  const gate = new Promise((r) => { open = () => r(undefined); });
  const prev = writeTail;
  writeTail = gate;
  return prev.then(fn).finally(open);
}

/** A session write whose failure becomes a toast (resolves to null). */
async function write(type, fields = {}) {
  try {
    return await serialWrite(type, fields);
  } catch (e) {
    if (!(e instanceof ProtocolError)) throw e;
    report(e);
    return null;
  }
}

async function refreshList() {
  const r = await call("session.list", { trash: true });
  if (r) state.setSessions(r.sessions, r.trash);
}

/** @param {string | null} id  null: the server's choice (last opened, newest, or a new one) */
async function openSession(id) {
  if (id) state.open(id);
  const r = await call("session.open", id ? { session: id } : {}, {
    onMessage: (m) => {
      if (m.type === "state" && m.session) {
        state.open(m.session.id);
        state.expectFresh = m.session.id;
      }
    },
    quiet: ["not_found", "corrupt_session"],
  });
  if (!r && id) {
    if (state.currentId === id) {
      view.toast("That session could not be opened (deleted or unreadable).");
      state.applyState(null);   // -> the change handler opens the server's choice
    }
    return;
  }
  if (r && location.hash !== `#${r.session}`) history.replaceState(null, "", `#${r.session}`);
}

/**
 * What the server had for each pending key when the user changed it ("fixed_prompt",
 * "settings.temperature", ...), as JSON. A change that waited (offline, or while a reply streamed)
 * is dropped if the server's value moved meanwhile: another window's newer edit wins over ours.
 * @type {Map<string, string>}
 */
const pendingBase = new Map();

/** @param {any} s @param {string} key */
function serverValue(s, key) {
  const v = key.startsWith("settings.") ? s.settings[key.slice(9)] : s[key];
  return JSON.stringify(v ?? null);
}

/** @param {Record<string, any>} changes */
function update(changes) {
  const s = state.session;
  if (!s) return;
  for (const [k, v] of Object.entries(changes)) {
    const keys = k === "settings" ? Object.keys(v).map((x) => `settings.${x}`) : [k];
    for (const key of keys) if (!pendingBase.has(key)) pendingBase.set(key, serverValue(s, key));
  }
  pendingChanges = mergeChanges(pendingChanges, changes);
  flush();
}

function mergeChanges(a, b) {
  if (!a) return { ...b };
  const out = { ...a, ...b };
  if (a.settings && b.settings) out.settings = { ...a.settings, ...b.settings };
  return out;
}

/** Remove from `changes` what the server changed since the user's edit; returns the labels dropped. */
function dropConflicts(changes, s) {
  const dropped = [];
  for (const [key, base] of pendingBase) {
    if (serverValue(s, key) === base) continue;
    if (key.startsWith("settings.") && changes.settings) {
      delete changes.settings[key.slice(9)];
      if (!Object.keys(changes.settings).length) delete changes.settings;
    } else delete changes[key];
    pendingBase.delete(key);
    dropped.push(key.replace("settings.", "").replace(/_/g, " "));
  }
  return dropped;
}

async function flush() {
  const s = state.session;
  if (!pendingChanges || flushing || !s || state.generating || !state.connected) return;
  const changes = pendingChanges;
  pendingChanges = null;
  const dropped = dropConflicts(changes, s);
  if (dropped.length) {
    view.toast(`Not saved: ${dropped.join(", ")} changed in another window meanwhile.`, { kind: "info" });
    panel.render(true);
  }
  const bases = new Map(pendingBase);
  pendingBase.clear();
  if (!Object.keys(changes).length) return;
  flushing = true;
  let wait = false;   // busy / offline: the next state change or hello flushes again
  try {
    await serialWrite("session.update", { changes });
  } catch (e) {
    if (!(e instanceof ProtocolError)) throw e;
    if (["busy", "disconnected", "stale_revision"].includes(e.code)) {
      // Kept for later (the session is free again / we are back / the fresh snapshot is in), and
      // checked against the server's values again then.
      pendingChanges = mergeChanges(changes, pendingChanges ?? {});
      for (const [k, v] of bases) if (!pendingBase.has(k)) pendingBase.set(k, v);
      wait = e.code !== "stale_revision";
    } else {
      report(e);
      panel.render(true);
    }
  } finally {
    flushing = false;
  }
  if (pendingChanges && !wait) flush();
}

// ---- actions (view callbacks) --------------------------------------------------------------------

const actions = {
  open: (id) => openSession(id),
  async create() {
    const r = await call("session.create", {}, {
      onMessage: (m) => { if (m.type === "state" && m.session) state.open(m.session.id); },
    });
    if (r) {
      view.drawer(null);
      history.replaceState(null, "", `#${r.session}`);
      await refreshList();
      // Ready to type, unless the user already went somewhere else (e.g. renaming it).
      const a = document.activeElement;
      if (!a || a === document.body || a.id === "new-session") view.input.focus();
    }
  },
  async rename(id, name) {
    const ok = await exclusive(async () => {
      const r = await call("session.rename", { session: id, name });
      // The requester gets no state for a rename: re-read the open session for its new revision
      // before any other write goes out with the old one.
      if (r && id === state.currentId) await openSession(id);
      return !!r;
    });
    if (ok) await refreshList();
  },
  async duplicate(id) {
    const r = await call("session.duplicate", { session: id });
    if (r) {
      await refreshList();
      await openSession(r.session);
      view.toast("Duplicated.", { kind: "info" });
    }
  },
  async remove(id) {
    const info = state.sessions.find((s) => s.id === id);
    const r = await call("session.delete", { session: id });
    if (!r) return;
    await refreshList();   // (deleting the open session: the state change opens another one)
    view.toast(`Deleted “${info?.name ?? "session"}”.`, { kind: "info", timeout: 10000,
      action: { label: "Undo", run: () => actions.restore(id) } });
  },
  async restore(id) {
    const r = await call("session.restore", { session: id });
    if (r) {
      await refreshList();
      await openSession(id);
    }
  },
  exportSession(id) {
    const a = document.createElement("a");
    a.href = `/api/sessions/${encodeURIComponent(id)}/export`;
    a.download = "";
    document.body.append(a);
    a.click();
    a.remove();
  },
  async importFile(file) {
    try {
      const text = await file.text();
      const res = await fetch("/api/sessions/import", { method: "POST", body: text,
        headers: { "Content-Type": "application/json" }, credentials: "same-origin" });
      const data = await res.json().catch(() => ({}));
      if (!res.ok) throw new Error(data?.error?.message || `import failed (HTTP ${res.status})`);
      await refreshList();
      await openSession(data.session);
      view.toast(`Imported “${file.name}”.`, { kind: "info" });
    } catch (e) {
      view.toast(`Import failed: ${e instanceof Error ? e.message : String(e)}`);
    }
  },
  async send(text, bot) {
    view.clearInput();
    view.scrollToBottom();
    const r = await write("chat.send", bot ? { text, bot } : { text });
    if (!r && !view.input.value) {
      // Nothing was saved (refused): give the text back instead of losing it.
      const last = state.session?.messages.at(-1);
      if (!last || last.text !== text) { view.input.value = text; view.autosize(); }
    }
  },
  generate(bot) {
    view.scrollToBottom();
    return write("chat.generate", bot ? { bot } : {});
  },
  stop() {
    const s = state.session;
    if (s) call("chat.stop", { session: s.id });
  },
  regenerate: (id) => { view.scrollToBottom(); return write("chat.regenerate", { message_id: id }); },
  cont: (id) => { view.scrollToBottom(); return write("chat.continue", { message_id: id }); },
  edit: (id, text, reply) => write("chat.edit", reply ? { message_id: id, text, reply: true } : { message_id: id, text }),
  deleteMessage: (id) => write("chat.delete", { message_id: id }),
  rewind: (id) => write("chat.rewind", { message_id: id }),
  switchAlt: (id, dir) => write("chat.switch", { message_id: id, direction: dir }),
  async branch(id) {
    const s = state.session;
    if (!s) return;
    const r = await call("session.duplicate", { session: s.id, upto: id, name: `${s.name} (branch)`.slice(0, 120) });
    if (r) {
      await refreshList();
      await openSession(r.session);
      view.toast("Opened a copy of the conversation up to that message.", { kind: "info" });
    }
  },
  toggleTheme() {
    const root = document.documentElement;
    const system = window.matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light";
    const now = root.dataset.theme || system;
    const next = now === "dark" ? "light" : "dark";
    try {
      if (next === system) { delete root.dataset.theme; localStorage.removeItem(THEME_KEY); }
      else { root.dataset.theme = next; localStorage.setItem(THEME_KEY, next); }
    } catch { root.dataset.theme = next; }
    renderThemeButton();
  },
};

const view = new View(state, actions);
const panel = new Panel(state, { update, toast: (m) => view.toast(m) });

function renderThemeButton() {
  const b = document.getElementById("toggle-theme");
  if (!b) return;
  const system = window.matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light";
  const now = document.documentElement.dataset.theme || system;
  b.title = now === "dark" ? "Switch to the light theme" : "Switch to the dark theme";
  b.setAttribute("aria-label", b.title);
  document.documentElement.classList.toggle("is-dark", now === "dark");
}

// ---- server messages -----------------------------------------------------------------------------

state.addEventListener("change", (ev) => {
  const what = /** @type {CustomEvent} */ (ev).detail.what;
  if (what === "session") {
    view.renderSession();
    panel.render();
    if (!state.generating && pendingChanges) flush();
    if (!state.session && state.connected && !state.currentId) openSession(null);
  } else if (what === "sessions") view.sidebar.render();
  else if (what === "stream") { view.renderStream(); view.renderQueue(); }
  else if (what === "queue") view.renderQueue();
  else if (what === "model") panel.renderModel();
  else if (what === "connection") view.renderComposer();
});

transport.addEventListener("message", (ev) => {
  const msg = /** @type {CustomEvent} */ (ev).detail;
  switch (msg.type) {
    case "state":
      if (msg.session === null && msg.id === null && state.session) {
        view.toast(`“${state.session.name}” was deleted in another window.`, { kind: "info" });
      }
      state.applyState(msg.session);
      break;
    case "sessions": state.setSessions(msg.sessions); break;
    case "queue": case "stream.start": case "stream.delta": case "stream.end": state.applyStream(msg); break;
    case "error": if (msg.id == null) view.toast(msg.message || msg.code); break;
    default: break;
  }
});

transport.addEventListener("hello", async (ev) => {
  const hello = /** @type {CustomEvent} */ (ev).detail;
  state.setModel(hello.model, hello.limits);
  state.streaming = null;   // text streamed while we were away is missing: take it from the next snapshot
  state.setConnected(true);
  const fromHash = location.hash.slice(1);
  const want = state.currentId ?? (SESSION_ID_RE.test(fromHash) ? fromHash : null);
  await Promise.all([refreshList(), openSession(want)]);
  flush();
});

transport.addEventListener("status", (ev) => {
  const st = /** @type {CustomEvent} */ (ev).detail;
  if (!st.connected && state.connected) state.setConnected(false);
  view.renderConnection(st);
});

window.addEventListener("hashchange", () => {
  const id = location.hash.slice(1);
  if (SESSION_ID_RE.test(id) && id !== state.currentId) openSession(id);
});

// ---- keyboard ------------------------------------------------------------------------------------

document.addEventListener("keydown", (e) => {
  const target = /** @type {HTMLElement} */ (e.target);
  if (e.key === "Escape") {
    if (state.generating) { e.preventDefault(); actions.stop(); return; }
    if (view.app.classList.contains("show-sessions") || view.app.classList.contains("show-settings")) view.drawer(null);
    return;
  }
  if (e.key === "Enter" && e.altKey && !e.ctrlKey && !target.closest?.(".editing, #settings")) {
    e.preventDefault();
    const last = state.messages.at(-1);
    if (!state.generating && last && last.role === "bot") actions.cont(last.id);
    return;
  }
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && !target.closest?.(".editing, #settings")) {
    e.preventDefault();
    if (state.generating || !state.session) return;
    const last = state.messages.at(-1);
    if (last && last.role === "bot") actions.regenerate(last.id);
    else actions.generate(view.speaker.value || null);
  }
});

window.matchMedia("(prefers-color-scheme: dark)").addEventListener("change", renderThemeButton);
renderThemeButton();
view.renderSession();
panel.render();
transport.connect();

// A handle for debugging in the console (and the browser tests).
Object.defineProperty(window, "exllamaChat", { value: Object.freeze({ state, transport, view }) });
