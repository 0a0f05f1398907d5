// @ts-check
/**
 * The session list: open, rename, duplicate, export, delete (to the trash), and the trash with
 * restore. Names go in as text only. Intents go out through main.js's actions.
 */
import { ago, byId, h, iconButton, inlineEdit } from "./dom.js";

/** @typedef {import("./state.js").ChatState} ChatState */

export class Sidebar {
  /**
   * @param {ChatState} state
   * @param {import("./view.js").Actions} actions
   * @param {() => void} closeDrawer  on a phone the list is a drawer: close it after opening a session
   */
  constructor(state, actions, closeDrawer) {
    this.state = state;
    this.actions = actions;
    this.closeDrawer = closeDrawer;
    this.sessionList = byId("session-list");
    this.trash = /** @type {HTMLDetailsElement} */ (byId("trash"));
    this.trashList = byId("trash-list");
    this.trashCount = byId("trash-count");
    this.renaming = false;
  }

  render() {
    if (this.renaming) return;   // redrawn when the rename ends
    const { sessions, trash, currentId } = this.state;
    const rows = sessions.map((s) => this.row(s, s.id === currentId));
    if (!rows.length) rows.push(h("p", { className: "muted pad", text: "No sessions yet." }));
    this.sessionList.replaceChildren(...rows);
    this.trashCount.textContent = trash.length ? String(trash.length) : "";
    this.trash.hidden = trash.length === 0;
    this.trashList.replaceChildren(...trash.map((s) => {
      const row = h("li", { className: "trash-row" },
        h("span", { className: "trash-name", text: s.name, title: s.name }),
        h("span", { className: "muted small", text: ago(s.deleted) }));
      row.append(iconButton("restore", `Restore “${s.name}”`, () => this.actions.restore(s.id), "small"));
      return row;
    }));
  }

  row(s, active) {
    const meta = s.error ? "unreadable" : `${s.message_count} message${s.message_count === 1 ? "" : "s"} · ${ago(s.updated)}`;
    const main = h("button", { type: "button", className: "session-open", title: s.name,
      onclick: () => { this.actions.open(s.id); this.closeDrawer(); } },
    h("span", { className: "session-name", text: s.name }),
    h("span", { className: "session-meta", text: meta }));
    if (active) main.setAttribute("aria-current", "true");
    const acts = h("div", { className: "session-actions" });
    if (!s.error) {
      acts.append(
        iconButton("rename", "Rename", () => this.renameRow(row, s)),
        iconButton("dup", "Duplicate", () => this.actions.duplicate(s.id)));
    }
    acts.append(iconButton("download", "Export (download)", () => this.actions.exportSession(s.id)));
    acts.append(iconButton("trash", "Delete (to the trash)", () => this.actions.remove(s.id), "danger"));
    const row = h("div", { className: `session-row${active ? " active" : ""}`, dataset: { id: s.id } }, main, acts);
    return row;
  }

  renameRow(row, s) {
    const input = h("input", { className: "rename-input", value: s.name, maxLength: 120,
      attrs: { "aria-label": "Session name" } });
    row.replaceChildren(input);
    this.renaming = true;
    inlineEdit(/** @type {HTMLInputElement} */ (input), s.name, (name) => this.actions.rename(s.id, name),
      () => { this.renaming = false; this.render(); });
  }
}
