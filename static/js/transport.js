// @ts-check
/**
 * The websocket to the chat server (docs/protocol.md): request ids, one promise per request,
 * an async iterator over a request's messages, and reconnection with backoff.
 *
 *   const t = new Transport("/ws");
 *   t.addEventListener("hello", e => ...);          // every (re)connection, detail = the hello message
 *   t.addEventListener("message", e => ...);        // every server message (state, stream.*, pushes, ...)
 *   t.addEventListener("status", e => ...);         // detail = {connected, retryIn}
 *   t.connect();
 *   const reply = await t.request("session.list");  // resolves with the reply, rejects with ProtocolError
 *   for await (const msg of t.stream("chat.send", {...})) { ... }   // every message of that request
 *
 * The transport never replays a request after a reconnect: the server may already have applied it,
 * and the page re-reads the session state instead (the server's copy always wins).
 */

export class ProtocolError extends Error {
  /** @param {{code: string, message: string, field?: string, revision?: number}} msg */
  constructor(msg) {
    super(msg.message || msg.code);
    this.name = "ProtocolError";
    this.code = msg.code;
    this.field = msg.field;
    this.detail = msg;
  }
}

/**
 * @typedef {{resolve: (m: any) => void, reject: (e: Error) => void, type: string,
 *            onMessage?: (m: any) => void}} Pending
 */

export class Transport extends EventTarget {
  /**
   * @param {string} url  the websocket path or URL (relative URLs resolve against the page)
   * @param {{minDelay?: number, maxDelay?: number}} [options]  reconnect backoff, in ms
   */
  constructor(url, options = {}) {
    super();
    const u = new URL(url, window.location.href);
    if (u.protocol === "http:") u.protocol = "ws:";
    if (u.protocol === "https:") u.protocol = "wss:";
    this.url = u.href;
    this.minDelay = options.minDelay ?? 400;
    this.maxDelay = options.maxDelay ?? 10000;
    /** @type {WebSocket | null} */
    this.ws = null;
    this.connected = false;   // true once the server's hello arrived
    this.attempt = 0;
    this.nextId = 1;
    /** @type {Map<string, Pending>} */
    this.pending = new Map();
    /** @type {ReturnType<typeof setTimeout> | null} */
    this.timer = null;
    this.stopped = false;
    this.hello = null;
    // A tab that comes back (laptop lid, phone screen) should not wait out a long backoff.
    window.addEventListener("online", () => this.retryNow());
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "visible") this.retryNow();
    });
  }

  connect() {
    this.stopped = false;
    if (this.ws && (this.ws.readyState === WebSocket.OPEN || this.ws.readyState === WebSocket.CONNECTING)) return;
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch (e) {
      this.scheduleReconnect();
      return;
    }
    this.ws = ws;
    ws.addEventListener("message", (ev) => this.onFrame(ev.data));
    ws.addEventListener("close", () => {
      if (this.ws === ws) this.onClose();
    });
    ws.addEventListener("error", () => { /* a close event follows */ });
  }

  /** Close for good (no reconnect). */
  close() {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    this.ws?.close();
  }

  retryNow() {
    if (this.stopped || this.connected || !this.timer) return;
    clearTimeout(this.timer);
    this.timer = null;
    this.attempt = 0;
    this.connect();
  }

  /** @param {any} data */
  onFrame(data) {
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      return;
    }
    if (!msg || typeof msg !== "object") return;
    if (msg.type === "hello") {
      this.connected = true;
      this.attempt = 0;
      this.hello = msg;
      this.status();
      this.dispatchEvent(new CustomEvent("hello", { detail: msg }));
      return;
    }
    // The request's own listener first (it may prepare how the message is applied), then everyone.
    const p = msg.id != null ? this.pending.get(msg.id) : undefined;
    p?.onMessage?.(msg);
    this.dispatchEvent(new CustomEvent("message", { detail: msg }));
    if (!p) return;
    if (msg.type === "reply") {
      this.pending.delete(msg.id);
      p.resolve(msg);
    } else if (msg.type === "error") {
      this.pending.delete(msg.id);
      p.reject(new ProtocolError(msg));
    }
  }

  onClose() {
    const was = this.connected;
    this.connected = false;
    this.ws = null;
    for (const p of this.pending.values()) {
      p.reject(new ProtocolError({ code: "disconnected", message: "the connection to the server was lost" }));
    }
    this.pending.clear();
    if (!this.stopped) this.scheduleReconnect();
    if (was || this.attempt <= 1) this.status();
  }

  scheduleReconnect() {
    if (this.timer) clearTimeout(this.timer);
    const base = Math.min(this.maxDelay, this.minDelay * 2 ** this.attempt);
    const delay = Math.round(base * (0.75 + Math.random() * 0.5));   // jitter: tabs don't stampede
    this.attempt += 1;
    this.retryAt = Date.now() + delay;
    this.timer = setTimeout(() => {
      this.timer = null;
      this.connect();
    }, delay);
    this.status();
  }

  status() {
    const retryIn = this.connected || !this.retryAt ? 0 : Math.max(0, this.retryAt - Date.now());
    this.dispatchEvent(new CustomEvent("status", { detail: { connected: this.connected, retryIn } }));
  }

  /**
   * Send one request; resolves with its `reply`, rejects with a ProtocolError (the server's `error`,
   * or code "disconnected"). `onMessage` sees every message of the request (state, stream.*, queue).
   * @param {string} type
   * @param {Record<string, any>} [fields]
   * @param {{onMessage?: (m: any) => void}} [options]
   * @returns {Promise<any>}
   */
  request(type, fields = {}, options = {}) {
    return new Promise((resolve, reject) => {
      if (!this.connected || !this.ws || this.ws.readyState !== WebSocket.OPEN) {
        reject(new ProtocolError({ code: "disconnected", message: "not connected to the server (reconnecting…)" }));
        return;
      }
      const id = `r${this.nextId++}`;
      this.pending.set(id, { resolve, reject, type, onMessage: options.onMessage });
      try {
        this.ws.send(JSON.stringify({ ...fields, type, id }));
      } catch (e) {
        this.pending.delete(id);
        reject(new ProtocolError({ code: "disconnected", message: String(e) }));
      }
    });
  }

  /**
   * Every message of one request as an async iterator, ending with its reply (an error throws).
   * @param {string} type
   * @param {Record<string, any>} [fields]
   */
  async *stream(type, fields = {}) {
    /** @type {any[]} */
    const queue = [];
    /** @type {(() => void) | null} */
    let wake = null;
    let done = false;
    /** @type {Error | null} */
    let failure = null;
    const notify = () => { if (wake) { wake(); wake = null; } };
    this.request(type, fields, { onMessage: (m) => { if (m.type !== "error") queue.push(m); notify(); } })
      .then(() => { done = true; notify(); }, (e) => { failure = e; done = true; notify(); });
    while (true) {
      if (queue.length) {
        yield queue.shift();
        continue;
      }
      if (failure) throw failure;
      if (done) return;
      await new Promise((r) => { wake = () => r(undefined); });
    }
  }
}
