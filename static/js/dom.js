// @ts-check
/**
 * DOM building blocks. Everything is made with createElement and text goes in through textContent
 * (never markup), so names and messages cannot inject anything. Markdown is the one exception and
 * lives in markdown.js.
 */

/**
 * h("button", {className: "btn", text: "Send", onclick: f, dataset: {id: "x"}, attrs: {"aria-label": "…"}}, child, …)
 * Properties are assigned as DOM properties (textContent, value, title, …); `attrs` go through
 * setAttribute (never "style" or "on*": those are refused).
 * @param {string} tag
 * @param {Record<string, any>} [props]
 * @param {...(Node | string | null | undefined | false)} children
 * @returns {HTMLElement}
 */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v === undefined || v === null) continue;
    if (k === "text") el.textContent = String(v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k === "attrs") {
      for (const [a, x] of Object.entries(v)) {
        if (x === undefined || x === null || x === false) continue;
        if (a === "style" || a.toLowerCase().startsWith("on")) throw new Error(`h: attribute ${a} refused`);
        el.setAttribute(a, x === true ? "" : String(x));
      }
    } else if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else /** @type {any} */ (el)[k] = v;
  }
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c);   // strings become text nodes
  }
  return el;
}

const SVG = "http://www.w3.org/2000/svg";

/** Icon paths (24×24, stroked); ours only, never data from the server. */
const ICONS = {
  menu: "M4 6h16M4 12h16M4 18h16",
  settings: "M4 7h10M18 7h2M4 17h4M12 17h8M14 5v4M8 15v4",
  sun: "M12 4V2M12 22v-2M4 12H2M22 12h-2M5.6 5.6 4.2 4.2M19.8 19.8l-1.4-1.4M5.6 18.4l-1.4 1.4M19.8 4.2l-1.4 1.4M12 16a4 4 0 1 0 0-8 4 4 0 0 0 0 8z",
  moon: "M20 14.5A8 8 0 0 1 9.5 4 8 8 0 1 0 20 14.5z",
  auto: "M12 3a9 9 0 1 0 0 18V3z M12 3a9 9 0 0 1 0 18",
  plus: "M12 5v14M5 12h14",
  send: "M5 12h13M13 6l6 6-6 6",
  stop: "M7 7h10v10H7z",
  regen: "M20 11a8 8 0 1 0-2.3 5.7M20 5v6h-6",
  cont: "M5 12h10M11 8l4 4-4 4M19 6v12",
  edit: "M4 20h4L19 9l-4-4L4 16v4zM13.5 6.5l4 4",
  trash: "M5 7h14M10 11v6M14 11v6M6 7l1 13h10l1-13M9 7V4h6v3",
  rewind: "M11 18 5 12l6-6M19 18l-6-6 6-6",
  branch: "M6 3v12M18 9a3 3 0 1 0 0-6 3 3 0 0 0 0 6zM6 21a3 3 0 1 0 0-6 3 3 0 0 0 0 6zM18 9a9 9 0 0 1-9 9",
  copy: "M9 9h11v11H9zM5 15H4V4h11v1",
  dup: "M8 8h12v12H8zM4 16V4h12",
  download: "M12 4v11M7 10l5 5 5-5M5 20h14",
  upload: "M12 20V9M7 14l5-5 5 5M5 4h14",
  rename: "M4 20h16M6 16l9-9 3 3-9 9H6v-3z",
  close: "M6 6l12 12M18 6 6 18",
  left: "M15 6l-6 6 6 6",
  right: "M9 6l6 6-6 6",
  down: "M12 5v14M6 13l6 6 6-6",
  restore: "M4 12a8 8 0 1 0 2.3-5.7M4 5v6h6",
  play: "M8 5v14l11-7z",
  user: "M12 12a4 4 0 1 0 0-8 4 4 0 0 0 0 8zM4 21a8 8 0 0 1 16 0",
  bot: "M6 8h12v11H6zM12 4v4M9 13h.01M15 13h.01M9 16h6",
};

/**
 * @param {keyof typeof ICONS} name
 * @returns {SVGSVGElement}
 */
export function icon(name) {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("aria-hidden", "true");
  svg.setAttribute("class", "icon");
  const path = document.createElementNS(SVG, "path");
  path.setAttribute("d", ICONS[name]);
  svg.append(path);
  return svg;
}

/**
 * An icon button with an accessible label (also its tooltip).
 * @param {keyof typeof ICONS} name
 * @param {string} label
 * @param {(ev: MouseEvent) => void} onclick
 * @param {string} [className]
 */
export function iconButton(name, label, onclick, className = "") {
  const b = h("button", { type: "button", className: `icon-btn ${className}`.trim(), title: label,
    attrs: { "aria-label": label }, onclick });
  b.append(icon(name));
  return b;
}

/**
 * Look up an element by id once, failing loudly if the template lacks it.
 * @template {HTMLElement} T
 * @param {string} id
 * @returns {T}
 */
export function byId(id) {
  const el = document.getElementById(id);
  if (!el) throw new Error(`page element #${id} is missing (templates/index.html)`);
  return /** @type {T} */ (el);
}

/** "3 min ago" style times (Unix seconds). */
export function ago(t) {
  if (!t) return "";
  const s = Math.max(0, Date.now() / 1000 - t);
  if (s < 45) return "just now";
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  if (s < 86400 * 7) return `${Math.round(s / 86400)} d ago`;
  return new Date(t * 1000).toLocaleDateString();
}

/** Two-step confirmation without a dialog: the first click arms the button for 3 s. */
export function armed(button, label, action) {
  return () => {
    if (button.classList.contains("armed")) {
      button.classList.remove("armed");
      action();
      return;
    }
    button.classList.add("armed");
    const old = button.title;
    button.title = label;
    button.setAttribute("aria-label", label);
    setTimeout(() => {
      button.classList.remove("armed");
      button.title = old;
      button.setAttribute("aria-label", old);
    }, 3000);
  };
}

/**
 * Edit a name in place: Enter or leaving the field saves, Esc cancels.
 * @param {HTMLInputElement} input @param {string} old
 * @param {(v: string) => void} commit @param {() => void} done
 */
export function inlineEdit(input, old, commit, done) {
  let finished = false;
  const finish = (save) => {
    if (finished) return;
    finished = true;
    const v = input.value.trim();
    if (save && v && v !== old) commit(v);
    done();
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") { e.preventDefault(); finish(true); }
    if (e.key === "Escape") { e.preventDefault(); e.stopPropagation(); finish(false); }
  });
  input.addEventListener("blur", () => finish(true));
  input.focus();
  input.select();
}

/**
 * A non-blocking notice in `container` (never alert()); at most four at a time.
 * @param {HTMLElement} container
 * @param {string} message
 * @param {{kind?: "error"|"info", action?: {label: string, run: () => void}, timeout?: number}} [opts]
 */
export function toast(container, message, opts = {}) {
  const kind = opts.kind ?? "error";
  const t = h("div", { className: `toast ${kind}`, attrs: { role: kind === "error" ? "alert" : "status" } },
    h("span", { className: "toast-text", text: message }));
  const close = () => {
    t.classList.add("leaving");
    setTimeout(() => t.remove(), 200);
  };
  if (opts.action) {
    const a = opts.action;
    t.append(h("button", { type: "button", className: "toast-action", text: a.label, onclick: () => { a.run(); close(); } }));
  }
  t.append(iconButton("close", "Dismiss", close, "toast-close"));
  container.append(t);
  while (container.children.length > 4) container.firstElementChild?.remove();
  setTimeout(close, opts.timeout ?? (kind === "error" ? 8000 : 5000));
}
