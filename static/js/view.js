// @ts-check
/**
 * The page's DOM: conversation, composer, title, context meter, drawers, toasts (the session list is
 * sidebar.js, the settings panel panel.js). Elements are looked up once (byId) and built with
 * createElement/textContent (dom.js); message text goes through markdown.js (marked + DOMPurify).
 * User intents go out through the `actions` callbacks that main.js provides; nothing here talks
 * to the server.
 */
import { armed, byId, h, iconButton, inlineEdit, toast } from "./dom.js";
import { renderMarkdown } from "./markdown.js";
import { Sidebar } from "./sidebar.js";
import { safeColor } from "./state.js";

/**
 * @typedef {import("./state.js").ChatState} ChatState
 * @typedef {import("./state.js").Message} Message
 * @typedef {{
 *   open(id: string): void, create(): void, rename(id: string, name: string): void, duplicate(id: string): void,
 *   remove(id: string): void, restore(id: string): void, exportSession(id: string): void, importFile(f: File): void,
 *   send(text: string, bot: string|null): void, generate(bot: string|null): void, stop(): void,
 *   regenerate(id: string): void, cont(id: string): void, edit(id: string, text: string, reply: boolean): void,
 *   deleteMessage(id: string): void, rewind(id: string|null): void, switchAlt(id: string, dir: number): void,
 *   branch(id: string): void, toggleTheme(): void,
 * }} Actions
 */

const NEAR_BOTTOM_PX = 60;

export class View {
  /** @param {ChatState} state @param {Actions} actions */
  constructor(state, actions) {
    this.state = state;
    this.actions = actions;
    this.app = byId("app");
    this.title = byId("session-title");
    this.meter = byId("context-meter");
    this.meterFill = byId("context-fill");
    this.meterReserved = byId("context-reserved");
    this.meterLabel = byId("context-label");
    this.connStatus = byId("conn-status");
    this.scroller = byId("messages");
    this.empty = byId("empty-state");
    this.list = byId("message-list");
    this.jump = byId("jump-bottom");
    this.input = /** @type {HTMLTextAreaElement} */ (byId("input"));
    this.sendBtn = /** @type {HTMLButtonElement} */ (byId("send"));
    this.stopBtn = /** @type {HTMLButtonElement} */ (byId("stop"));
    this.speaker = /** @type {HTMLSelectElement} */ (byId("next-speaker"));
    this.speakerWrap = byId("speaker-wrap");
    this.botTurn = /** @type {HTMLButtonElement} */ (byId("bot-turn"));
    this.queueStatus = byId("queue-status");
    this.toasts = byId("toasts");
    this.backdrop = byId("backdrop");
    /** @type {Map<string, {el: HTMLElement, sig: string}>} */
    this.rows = new Map();
    /** @type {HTMLElement | null} the "outside the context window" divider */
    this.marker = null;
    /** @type {string | null} message being edited */
    this.editing = null;
    this.streamFrame = 0;
    this.sidebar = new Sidebar(state, actions, () => this.drawer(null));
    this.wire();
  }

  // ---- wiring ------------------------------------------------------------------------------------

  wire() {
    byId("new-session").addEventListener("click", () => this.actions.create());
    const file = /** @type {HTMLInputElement} */ (byId("import-file"));
    file.addEventListener("change", () => {
      const f = file.files?.[0];
      if (f) this.actions.importFile(f);
      file.value = "";
    });
    byId("toggle-sidebar").addEventListener("click", () => this.drawer("sessions"));
    byId("toggle-settings").addEventListener("click", () => this.drawer("settings"));
    byId("close-settings").addEventListener("click", () => this.drawer(null));
    byId("toggle-theme").addEventListener("click", () => this.actions.toggleTheme());
    this.backdrop.addEventListener("click", () => this.drawer(null));
    this.title.addEventListener("click", () => this.renameInline());
    this.title.addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); this.renameInline(); } });

    this.scroller.addEventListener("scroll", () => {
      this.jump.hidden = this.atBottom();
    }, { passive: true });
    this.jump.addEventListener("click", () => this.scrollToBottom());

    this.input.addEventListener("input", () => this.autosize());
    this.input.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.ctrlKey && !e.metaKey && !e.altKey && !e.isComposing) {
        e.preventDefault();
        this.submit();
      }
    });
    this.sendBtn.addEventListener("click", () => this.submit());
    this.stopBtn.addEventListener("click", () => this.actions.stop());
    this.botTurn.addEventListener("click", () => this.actions.generate(this.speaker.value || null));
    this.speaker.addEventListener("change", () => this.renderComposer());
  }

  submit() {
    const text = this.input.value;
    if (!text.trim() || this.state.generating || !this.state.session) return;
    this.actions.send(text, this.speaker.value || null);
  }

  clearInput() {
    this.input.value = "";
    this.autosize();
  }

  autosize() {
    this.input.style.height = "auto";    // CSSOM (allowed by the CSP), not a style attribute in markup
    this.input.style.height = `${Math.min(this.input.scrollHeight, 240)}px`;
  }

  /** @param {"sessions" | "settings" | null} which  open a drawer (phone/tablet) or toggle the settings column */
  drawer(which) {
    const cls = this.app.classList;
    const wide = window.matchMedia("(min-width: 1180px)").matches;
    if (which === "settings" && wide) {
      cls.toggle("settings-collapsed");
      cls.remove("show-sessions", "show-settings");
      this.backdrop.hidden = true;
      return;
    }
    const sessionsOpen = which === "sessions" && !cls.contains("show-sessions");
    const settingsOpen = which === "settings" && !cls.contains("show-settings");
    cls.toggle("show-sessions", sessionsOpen);
    cls.toggle("show-settings", settingsOpen);
    if (settingsOpen) cls.remove("settings-collapsed");
    this.backdrop.hidden = !(sessionsOpen || settingsOpen);
  }

  // ---- title -----------------------------------------------------------------------------------

  renameInline() {
    const s = this.state.session;
    if (!s) return;
    const input = /** @type {HTMLInputElement} */ (h("input", { className: "rename-input title-input", value: s.name,
      maxLength: 120, attrs: { "aria-label": "Session name" } }));
    this.title.hidden = true;
    this.title.after(input);
    inlineEdit(input, s.name, (name) => this.actions.rename(s.id, name), () => {
      input.remove();
      this.title.hidden = false;
    });
  }

  // ---- the open session ------------------------------------------------------------------------

  renderSession() {
    const st = this.state;
    const s = st.session;
    document.title = s ? `${s.name} · ExLlama chat` : "ExLlama chat";
    this.title.textContent = s ? s.name : (st.connected ? "Loading…" : "Not connected");
    this.renderMessages();
    this.renderMeter();
    this.renderComposer();
  }

  renderMessages() {
    const st = this.state;
    const msgs = st.messages;
    const follow = this.atBottom();   // measured before the update: follow only a reader at the bottom
    this.empty.hidden = msgs.length > 0 || !st.session;
    const seen = new Set();
    /** @type {HTMLElement[]} */
    const order = [];
    const dropped = msgs.filter((m) => !m.in_context).length;
    let markerPlaced = false;
    msgs.forEach((m, i) => {
      if (dropped && !markerPlaced && m.in_context) {
        order.push(this.dropMarker(dropped));
        markerPlaced = true;
      }
      const isLast = i === msgs.length - 1;
      const sig = JSON.stringify([m.text, m.author, st.color(m.author), m.tokens, m.tokens_per_s, m.sibling_index,
        m.sibling_count, m.in_context, !!m.streaming, isLast, m.role]);
      seen.add(m.id);
      let row = this.rows.get(m.id);
      if (this.editing === m.id && row) {
        order.push(row.el);
        return;
      }
      if (!row || row.sig !== sig) {
        const el = this.messageEl(m, isLast);
        if (row) row.el.replaceWith(el);
        row = { el, sig };
        this.rows.set(m.id, row);
      }
      order.push(row.el);
    });
    for (const id of [...this.rows.keys()]) {
      if (!seen.has(id)) {
        this.rows.get(id)?.el.remove();
        this.rows.delete(id);
        if (this.editing === id) this.editing = null;
      }
    }
    // Put the rows in order, moving only what is out of place (keeps focus and selection).
    let cursor = this.list.firstChild;
    for (const el of order) {
      if (el === cursor) {
        cursor = cursor.nextSibling;
      } else {
        this.list.insertBefore(el, cursor);
      }
    }
    while (cursor) {
      const next = cursor.nextSibling;
      cursor.remove();
      cursor = next;
    }
    // While a reply streams, history buttons are off (the server would answer "busy").
    const busy = st.generating;
    for (const b of /** @type {NodeListOf<HTMLButtonElement>} */ (this.list.querySelectorAll(".msg-actions button, .alt-nav button"))) {
      b.disabled = busy || b.dataset.edge === "1";
    }
    if (follow) this.scrollToBottom();
    else this.jump.hidden = this.atBottom();
  }

  dropMarker(n) {
    if (!this.marker) this.marker = h("div", { className: "drop-marker", attrs: { role: "note" } }, h("span"));
    /** @type {HTMLElement} */ (this.marker.firstChild).textContent =
      `${n} earlier message${n === 1 ? " is" : "s are"} outside the context window`;
    return this.marker;
  }

  /** @param {Message} m @param {boolean} isLast */
  messageEl(m, isLast) {
    const st = this.state;
    const color = st.color(m.author);
    const el = h("article", { className: `msg msg-${m.role === "user" ? "user" : "bot"}`,
      dataset: { id: m.id, role: m.role }, tabIndex: -1 });   // tabbable-by-tap: shows its actions on phones
    el.style.setProperty("--c", safeColor(color));   // CSSOM: allowed by style-src 'self'
    if (!m.in_context) el.classList.add("out-of-context");
    if (m.streaming) el.classList.add("streaming");

    const avatar = h("span", { className: "avatar", text: [...(m.author || "?")][0]?.toUpperCase() ?? "?",
      attrs: { "aria-hidden": "true" } });
    const head = h("header", { className: "msg-head" },
      h("span", { className: "msg-author", text: m.author }));
    if (m.sibling_count > 1) {
      const prev = iconButton("left", "Previous alternative", () => this.actions.switchAlt(m.id, -1), "alt-prev");
      const next = iconButton("right", "Next alternative", () => this.actions.switchAlt(m.id, 1), "alt-next");
      if (m.sibling_index <= 0) prev.dataset.edge = "1";
      if (m.sibling_index >= m.sibling_count - 1) next.dataset.edge = "1";
      head.append(h("span", { className: "alt-nav" }, prev,
        h("span", { className: "alt-pos", text: `${m.sibling_index + 1}/${m.sibling_count}` }), next));
    }
    const meta = [];
    if (m.tokens != null) meta.push(`${m.tokens} tok`);
    if (m.tokens_per_s != null) meta.push(`${m.tokens_per_s.toFixed(1)} tok/s`);
    if (meta.length) head.append(h("span", { className: "msg-meta", text: meta.join(" · ") }));
    if (!m.in_context) head.append(h("span", { className: "badge", text: "not in context" }));

    const body = h("div", { className: "msg-body" });
    this.fillBody(body, m);
    el.append(avatar, h("div", { className: "msg-main" }, head, body, m.streaming ? null : this.messageActions(m, isLast)));
    return el;
  }

  /** @param {HTMLElement} body @param {Message} m */
  fillBody(body, m) {
    if (m.text) body.replaceChildren(renderMarkdown(m.text));
    else body.replaceChildren(h("span", { className: "muted", text: m.streaming ? "" : "(empty)" }));
    if (m.streaming) body.append(h("span", { className: "caret", attrs: { "aria-hidden": "true" } }));
  }

  /** @param {Message} m @param {boolean} isLast */
  messageActions(m, isLast) {
    const acts = h("div", { className: "msg-actions" });
    /** @param {HTMLElement} b */
    const add = (b) => { acts.append(b); };
    if (m.role === "bot") {
      add(iconButton("regen", "Regenerate (new alternative)", () => this.actions.regenerate(m.id), "act-regenerate"));
      if (isLast) add(iconButton("cont", "Continue this reply", () => this.actions.cont(m.id), "act-continue"));
    }
    add(iconButton("edit", "Edit", () => this.startEdit(m), "act-edit"));
    if (!isLast) add(iconButton("rewind", "Rewind to here (later messages stay as a branch)", () => this.actions.rewind(m.id), "act-rewind"));
    add(iconButton("branch", "Copy up to here into a new session", () => this.actions.branch(m.id), "act-branch"));
    const del = iconButton("trash", "Delete this message and everything after it", () => {}, "act-delete danger");
    del.addEventListener("click", armed(del, "Click again to delete", () => this.actions.deleteMessage(m.id)));
    add(del);
    return acts;
  }

  /** @param {Message} m */
  startEdit(m) {
    const row = this.rows.get(m.id);
    if (!row) return;
    this.editing = m.id;
    const body = row.el.querySelector(".msg-body");
    const area = /** @type {HTMLTextAreaElement} */ (h("textarea", { className: "edit-area", value: m.text,
      attrs: { "aria-label": "Edit message" } }));
    const done = () => {
      this.editing = null;
      this.rows.delete(m.id);
      this.renderMessages();
    };
    const save = (reply) => {
      const text = area.value;
      this.editing = null;
      row.sig = "";   // redraw from the next snapshot whatever happens
      if (text !== m.text || reply) this.actions.edit(m.id, text, reply);
      else done();
    };
    const buttons = h("div", { className: "edit-buttons" },
      h("button", { type: "button", className: "btn primary small edit-save", text: "Save", onclick: () => save(false) }));
    if (m.role === "user") {
      buttons.append(h("button", { type: "button", className: "btn small edit-reply", text: "Save & get reply",
        onclick: () => save(true) }));
    }
    buttons.append(h("button", { type: "button", className: "btn ghost small edit-cancel", text: "Cancel", onclick: done }),
      h("span", { className: "muted small", text: "Ctrl+Enter saves · Esc cancels" }));
    area.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); e.stopPropagation(); save(false); }
      if (e.key === "Escape") { e.preventDefault(); e.stopPropagation(); done(); }
    });
    body?.replaceWith(h("div", { className: "msg-body editing" }, area, buttons));
    row.el.querySelector(".msg-actions")?.remove();
    area.style.height = `${Math.min(Math.max(area.scrollHeight + 4, 80), 480)}px`;
    area.focus();
  }

  /** Only the streaming message's text changed: redraw its body once per frame. */
  renderStream() {
    if (this.streamFrame) return;
    this.streamFrame = requestAnimationFrame(() => {
      this.streamFrame = 0;
      const s = this.state.streaming;
      if (!s) return;
      const m = this.state.messages.find((x) => x.id === s.message_id);
      const row = this.rows.get(s.message_id);
      if (!m || !row) {
        this.renderMessages();
        return;
      }
      const body = row.el.querySelector(".msg-body");
      const follow = this.atBottom();
      if (body && this.editing !== m.id) this.fillBody(/** @type {HTMLElement} */ (body), m);
      if (follow) this.scrollToBottom();
      else this.jump.hidden = false;
    });
  }

  distanceFromBottom() {
    const s = this.scroller;
    return s.scrollHeight - s.scrollTop - s.clientHeight;
  }

  atBottom() {
    return this.distanceFromBottom() < NEAR_BOTTOM_PX;
  }

  /** Show the latest message (also: the user just sent something, wherever they were). */
  scrollToBottom() {
    this.scroller.scrollTop = this.scroller.scrollHeight;
    this.jump.hidden = true;
  }

  // ---- context meter, composer, status ---------------------------------------------------------

  renderMeter() {
    const c = this.state.session?.context;
    if (!c || c.tokens_used == null || !c.tokens_total) {
      this.meter.hidden = true;
      return;
    }
    this.meter.hidden = false;
    const used = Math.min(1, c.tokens_used / c.tokens_total);
    const reserved = Math.min(1 - used, (c.reserved || 0) / c.tokens_total);
    this.meterFill.style.width = `${(used * 100).toFixed(1)}%`;
    this.meterReserved.style.width = `${(reserved * 100).toFixed(1)}%`;
    const pct = Math.round(((c.tokens_used + (c.reserved || 0)) / c.tokens_total) * 100);
    this.meter.classList.toggle("full", pct >= 90 || c.dropped.length > 0);
    this.meterLabel.textContent = `${c.tokens_used.toLocaleString()} / ${c.tokens_total.toLocaleString()}`;
    const parts = [`Context: ${c.tokens_used} tokens used + ${c.reserved} reserved for the reply, of ${c.tokens_total}.`];
    if (c.dropped.length) parts.push(`${c.dropped.length} message(s) no longer fit and are not shown to the model.`);
    if (!c.fixed_prompt_in_context) parts.push("The fixed prompt had to go.");
    parts.push(`Prompt format: ${c.format}.`);
    this.meter.title = parts.join(" ");
    this.meter.setAttribute("aria-label", parts.join(" "));
  }

  renderComposer() {
    const st = this.state;
    const s = st.session;
    const gen = st.generating;
    this.stopBtn.hidden = !gen;
    this.sendBtn.hidden = gen;
    this.sendBtn.disabled = !s || !st.connected;
    this.botTurn.disabled = !s || gen || !st.connected || (s.turn_order === "manual" && !this.speaker.value);
    // Next speaker: shown with several bots or the manual order.
    const bots = st.bots;
    const show = !!s && (bots.length > 1 || s.turn_order === "manual");
    this.speakerWrap.hidden = !show;
    if (show) {
      const want = [s.turn_order === "manual" ? ["", "Nobody (no reply)"] : ["", "Auto (turn order)"],
        ...bots.map((b) => [b.name, b.name])];
      const key = JSON.stringify(want);
      if (this.speaker.dataset.key !== key) {
        const keep = this.speaker.value;
        this.speaker.replaceChildren(...want.map(([v, label]) => h("option", { value: v, text: label })));
        this.speaker.dataset.key = key;
        this.speaker.value = want.some(([v]) => v === keep) ? keep : "";
      }
    } else {
      this.speaker.replaceChildren(h("option", { value: "", text: "Auto" }));
      this.speaker.dataset.key = "";
    }
    this.botTurn.disabled = !s || gen || !st.connected || (s.turn_order === "manual" && !this.speaker.value);
    this.renderQueue();
  }

  renderQueue() {
    const st = this.state;
    const g = st.session?.generating;
    let text = "";
    if (st.queuePosition > 0) text = `Waiting for the model: #${st.queuePosition} in line`;
    else if (g && g.queued && !st.streaming) text = "Waiting for the model…";
    else if (st.streaming && !st.streaming.done) text = `${st.streaming.author} is writing…`;
    else if (g) text = "Generating…";
    this.queueStatus.textContent = text;
    this.queueStatus.classList.toggle("waiting", st.queuePosition > 0);
  }

  /** @param {{connected: boolean, retryIn: number}} status */
  renderConnection(status) {
    this.connStatus.classList.toggle("offline", !status.connected);
    this.connStatus.textContent = status.connected ? "" : `Reconnecting${status.retryIn > 1500 ? ` in ${Math.round(status.retryIn / 1000)} s` : "…"}`;
    this.connStatus.hidden = status.connected;
    this.renderComposer();
  }

  // ---- toasts ----------------------------------------------------------------------------------

  /**
   * A non-blocking notice (never alert()).
   * @param {string} message
   * @param {{kind?: "error"|"info", action?: {label: string, run: () => void}, timeout?: number}} [opts]
   */
  toast(message, opts = {}) {
    toast(this.toasts, message, opts);
  }
}
