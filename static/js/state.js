// @ts-check
/**
 * What the page knows (no DOM): the model, the session list, the open session's snapshot
 * (docs/protocol.md §5) and the reply streaming into it. The server's snapshot is the only truth:
 * nothing here is ever sent back as a whole; the page sends small requests carrying the revision of
 * the latest snapshot and the server refuses stale ones.
 *
 * Events (`change`, detail = {what}): "model", "sessions", "session" (a new snapshot), "stream"
 * (streaming text grew), "queue", "connection".
 */

/** Sampler settings shown in the panel (protocol §4.1 ranges; `sliderMax`: the slider's end, the box goes further). */
export const SAMPLER_FIELDS = [
  { key: "temperature", label: "Temperature", min: 0, max: 5, sliderMax: 2, step: 0.01, hint: "0 = greedy" },
  { key: "top_k", label: "Top-k", min: 0, max: 1000, sliderMax: 200, step: 1, int: true, hint: "0 = off" },
  { key: "top_p", label: "Top-p", min: 0, max: 1, step: 0.01, hint: "0 or 1 = off" },
  { key: "min_p", label: "Min-p", min: 0, max: 1, step: 0.01, hint: "0 = off" },
  { key: "typical", label: "Typical", min: 0, max: 1, step: 0.01, hint: "0 or 1 = off" },
  { key: "token_repetition_penalty_max", label: "Repetition penalty", min: 1, max: 3, step: 0.01, hint: "1 = off" },
  { key: "token_repetition_penalty_sustain", label: "Penalty sustain", min: -1, max: 65536, sliderMax: 4096, step: 1, int: true, hint: "tokens at full penalty (-1 = all)" },
  { key: "token_repetition_penalty_decay", label: "Penalty decay", min: 0, max: 65536, sliderMax: 4096, step: 1, int: true, hint: "tokens over which it fades" },
  { key: "max_response_tokens", label: "Reply length", min: 1, max: 4096, sliderMax: 2048, step: 1, int: true, hint: "tokens (reserved in the context)" },
];

export const TURN_ORDERS = [
  { value: "model", label: "The model picks" },
  { value: "round_robin", label: "Round robin" },
  { value: "mentioned", label: "Mentioned bot first" },
  { value: "manual", label: "Manual (you pick)" },
];

export const BOT_COLORS = ["#d4a66a", "#8fd46a", "#d46a9f", "#6ad4c8", "#b06ad4", "#d4d06a"];
const COLOR_RE = /^#(?:[0-9a-fA-F]{3}|[0-9a-fA-F]{6}|[0-9a-fA-F]{8})$/;

/** A colour from the server, or a neutral one if it is not a plain hex colour. */
export function safeColor(c) {
  return typeof c === "string" && COLOR_RE.test(c) ? c : "#8a8f98";
}

/** #rgb -> #rrggbb (what <input type=color> takes). */
export function longColor(c) {
  const s = safeColor(c);
  if (s.length === 4) return "#" + [...s.slice(1)].map((x) => x + x).join("");
  return s.slice(0, 7);
}

/**
 * @typedef {{id: string, parent: string|null, role: string, author: string, text: string, tokens: number|null,
 *   tokens_per_s: number|null, sibling_index: number, sibling_count: number, in_context: boolean,
 *   streaming?: boolean, created?: number}} Message
 * @typedef {{message_id: string, author: string, parent: string|null, cont: boolean, text: string,
 *   base: string, done: boolean, revision?: number, tokens?: number, tokens_per_s?: number}} Streaming
 */

export class ChatState extends EventTarget {
  constructor() {
    super();
    this.model = null;
    this.limits = null;
    /** @type {any[]} */
    this.sessions = [];
    /** @type {any[]} */
    this.trash = [];
    /** @type {any} */
    this.session = null;
    /** @type {string | null} the session the page shows (or is opening) */
    this.currentId = null;
    /** @type {Streaming | null} */
    this.streaming = null;
    this.queuePosition = 0;
    this.connected = false;
    /** @type {string | null} the session whose next snapshot replaces ours whatever its revision */
    this.expectFresh = null;
  }

  /** @param {string} what */
  emit(what) {
    this.dispatchEvent(new CustomEvent("change", { detail: { what } }));
  }

  setModel(model, limits) {
    if (model) this.model = model;
    if (limits) this.limits = limits;
    this.emit("model");
  }

  setConnected(on) {
    this.connected = on;
    this.emit("connection");
  }

  setSessions(list, trash) {
    if (Array.isArray(list)) this.sessions = list;
    if (Array.isArray(trash)) this.trash = trash;
    this.emit("sessions");
  }

  /** @param {any} snapshot  a state message's session (null: the open session was deleted) */
  applyState(snapshot) {
    if (snapshot === null) {
      this.session = null;
      this.streaming = null;
      this.currentId = null;
      this.emit("session");
      return;
    }
    if (!snapshot || (this.currentId && snapshot.id !== this.currentId)) return;   // not the open one
    // An older snapshot arriving late is ignored, except the answer to an open (after a server
    // restart the file may legitimately be older: the server's copy wins).
    const fresh = this.expectFresh === snapshot.id;
    this.expectFresh = null;
    if (!fresh && this.session && this.session.id === snapshot.id && snapshot.revision < this.session.revision) return;
    this.session = snapshot;
    this.currentId = snapshot.id;
    const s = this.streaming;
    if (s && s.done && (s.revision == null || snapshot.revision >= s.revision)) this.streaming = null;
    if (!snapshot.generating) {
      this.streaming = null;
      this.queuePosition = 0;
    } else if (s && !s.done && s.cont) {
      // A continued message may have been saved meanwhile: its new text is the base again.
      const m = snapshot.messages.find((x) => x.id === s.message_id);
      if (m && m.text !== s.base) { s.base = m.text; s.text = ""; }
    }
    // Keep the list row in step (name, count) without waiting for a list refresh.
    const row = this.sessions.find((x) => x.id === snapshot.id);
    if (row) {
      row.name = snapshot.name;
      row.message_count = snapshot.messages.length;
      row.updated = snapshot.updated;
      row.revision = snapshot.revision;
    }
    this.emit("session");
    this.emit("sessions");
  }

  /** Forget the open session (before opening another). */
  open(id) {
    this.currentId = id;
    if (this.session && this.session.id !== id) {
      this.session = null;
      this.streaming = null;
      this.queuePosition = 0;
      this.emit("session");
    }
  }

  /** @param {any} msg  a stream.* or queue message; returns true if it concerned the open session */
  applyStream(msg) {
    if (!this.session || msg.session !== this.session.id) return false;
    if (msg.type === "queue") {
      this.queuePosition = msg.position;
      this.emit("queue");
      return true;
    }
    if (msg.type === "stream.start") {
      const base = msg.continue ? (this.session.messages.find((m) => m.id === msg.message_id)?.text ?? "") : "";
      this.streaming = { message_id: msg.message_id, author: msg.author, parent: msg.parent, cont: !!msg.continue,
        text: "", base, done: false };
      this.queuePosition = 0;
      this.emit("session");
      return true;
    }
    if (msg.type === "stream.delta") {
      let s = this.streaming;
      if (!s || s.message_id !== msg.message_id) {
        // Joined mid-stream (reconnect, second tab opened late): show it from here on.
        const g = this.session.generating;
        const known = this.session.messages.find((m) => m.id === msg.message_id);
        s = this.streaming = { message_id: msg.message_id, author: g?.author ?? known?.author ?? "", cont: !!known,
          parent: known ? known.parent : this.session.active_leaf, text: "", base: known?.text ?? "", done: false };
        this.emit("session");
      }
      s.text += msg.text;
      this.emit("stream");
      return true;
    }
    if (msg.type === "stream.end") {
      const s = this.streaming;
      if (s && s.message_id === msg.message_id) {
        if (msg.discarded) {
          this.streaming = null;
        } else {
          s.done = true;
          s.revision = msg.revision;
          s.tokens = msg.tokens;
          s.tokens_per_s = msg.tokens_per_s;
        }
      }
      this.emit("session");
      return true;
    }
    return false;
  }

  get generating() {
    return !!(this.session && (this.session.generating || (this.streaming && !this.streaming.done)));
  }

  /**
   * The messages to show: the snapshot's active path with the streaming reply applied (a new
   * message after its parent, or the continued text of an existing one).
   * @returns {Message[]}
   */
  get messages() {
    if (!this.session) return [];
    /** @type {Message[]} */
    const list = this.session.messages;
    const s = this.streaming;
    if (!s) return list;
    const i = list.findIndex((m) => m.id === s.message_id);
    if (s.cont || i >= 0) {
      if (i < 0) return list;
      const out = list.slice();
      const text = s.cont ? s.base + s.text : (s.done ? list[i].text : s.text);
      out[i] = { ...list[i], text, streaming: !s.done };
      return out;
    }
    let upto = list.length;
    if (s.parent === null) upto = 0;
    else {
      const p = list.findIndex((m) => m.id === s.parent);
      if (p >= 0) upto = p + 1;
    }
    return [...list.slice(0, upto), {
      id: s.message_id, parent: s.parent, role: "bot", author: s.author, text: s.text,
      tokens: s.done ? (s.tokens ?? null) : null, tokens_per_s: s.done ? (s.tokens_per_s ?? null) : null,
      sibling_index: 0, sibling_count: 1, in_context: true, streaming: !s.done,
    }];
  }

  /** @param {string} name */
  participant(name) {
    return this.session?.participants.find((p) => p.name === name) ?? null;
  }

  get bots() {
    return (this.session?.participants ?? []).filter((p) => p.kind === "bot");
  }

  get users() {
    return (this.session?.participants ?? []).filter((p) => p.kind === "user");
  }

  /** A participant's colour; authors that left the session get a neutral one. */
  color(name) {
    return safeColor(this.participant(name)?.color);
  }
}
