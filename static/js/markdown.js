// @ts-check
/**
 * Message text -> safe DOM. `marked` turns markdown into HTML, raw HTML in the text is shown as text
 * (a chat about code quotes tags; nothing a user or the model writes becomes markup), code blocks are
 * highlighted by highlight.js, and DOMPurify sanitises the result into a DocumentFragment (so this
 * module never assigns innerHTML itself). Links open in a new tab without an opener.
 */
import { Marked } from "../vendor/marked.js";
import DOMPurify from "../vendor/purify.js";
import hljs from "../vendor/highlight.js";
import { h, icon } from "./dom.js";

/** @param {string} s */
function escapeHtml(s) {
  return s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c] ?? c);
}

const md = new Marked({ gfm: true, breaks: true });
md.use({
  renderer: {
    /** @param {{text: string, block?: boolean}} token */
    html(token) {
      const text = escapeHtml(token.text);
      return token.block ? `<p>${text}</p>` : text;
    },
    /** @param {{text: string, lang?: string}} token */
    code(token) {
      const lang = (token.lang || "").trim().split(/\s+/)[0].replace(/[^\w+#.-]/g, "").slice(0, 32);
      let body = escapeHtml(token.text);
      if (lang && hljs.getLanguage(lang)) {
        try {
          body = hljs.highlight(token.text, { language: lang, ignoreIllegals: true }).value;
        } catch { /* plain text */ }
      }
      const cls = lang ? ` class="hljs language-${lang}"` : ` class="hljs"`;
      return `<pre data-lang="${escapeHtml(lang)}"><code${cls}>${body}</code></pre>\n`;
    },
  },
});

// Nothing that loads, runs, styles or submits: no images (remote ones are blocked by the CSP anyway),
// no SVG/MathML, no forms, no style. `id`/`name` are dropped against DOM clobbering.
const PURIFY = {
  FORBID_TAGS: ["style", "img", "svg", "math", "form", "input", "button", "textarea", "select", "option",
    "iframe", "frame", "object", "embed", "video", "audio", "source", "picture", "link", "meta", "base", "template"],
  FORBID_ATTR: ["style", "id", "name", "srcset", "action", "formaction", "background"],
  ALLOW_DATA_ATTR: false,
  ADD_ATTR: ["data-lang"],
  RETURN_DOM_FRAGMENT: true,
};

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
});

/**
 * Markdown text -> a sanitised fragment, with a copy button on each code block.
 * @param {string} text
 * @returns {DocumentFragment}
 */
export function renderMarkdown(text) {
  const html = /** @type {string} */ (md.parse(text, { async: false }));
  const frag = /** @type {DocumentFragment} */ (/** @type {unknown} */ (DOMPurify.sanitize(html, PURIFY)));
  for (const pre of frag.querySelectorAll("pre")) {
    const lang = pre.dataset.lang || "";
    const copy = h("button", { type: "button", className: "code-copy", title: "Copy code",
      attrs: { "aria-label": "Copy code" } }, icon("copy"), h("span", { text: "Copy" }));
    copy.addEventListener("click", () => copyText(pre.querySelector("code")?.textContent ?? "", copy));
    const head = h("div", { className: "code-head" }, h("span", { className: "code-lang", text: lang || "text" }), copy);
    const wrap = h("div", { className: "code-block" });
    pre.replaceWith(wrap);
    wrap.append(head, pre);
  }
  return frag;
}

/**
 * @param {string} text
 * @param {HTMLElement} [button]  shows "Copied" for a moment
 */
export async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
    if (button) {
      button.classList.add("done");
      setTimeout(() => button.classList.remove("done"), 1200);
    }
  } catch {
    /* no clipboard permission (e.g. plain http on a LAN address): nothing to do */
  }
}
