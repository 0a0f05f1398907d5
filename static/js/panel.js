// @ts-check
/**
 * The settings panel: fixed prompt, participants (bots with personas and colours), turn order,
 * sampler sliders with typed number boxes, model information. Every edit becomes a small
 * `session.update` change (main.js sends it with the latest revision); fields the user is editing
 * are never overwritten by an incoming snapshot.
 */
import { byId, h, iconButton } from "./dom.js";
import { BOT_COLORS, SAMPLER_FIELDS, TURN_ORDERS, longColor } from "./state.js";

/**
 * @typedef {import("./state.js").ChatState} ChatState
 * @typedef {{update(changes: Record<string, any>): void, toast(msg: string): void}} PanelActions
 */

export class Panel {
  /** @param {ChatState} state @param {PanelActions} actions */
  constructor(state, actions) {
    this.state = state;
    this.actions = actions;
    this.root = byId("settings");
    this.modelInfo = byId("model-info");
    this.fixedPrompt = /** @type {HTMLTextAreaElement} */ (byId("fixed-prompt"));
    this.keepFixed = /** @type {HTMLInputElement} */ (byId("keep-fixed"));
    this.template = /** @type {HTMLSelectElement} */ (byId("template"));
    this.participants = byId("participants");
    this.turnOrder = /** @type {HTMLSelectElement} */ (byId("turn-order"));
    this.maxTurns = /** @type {HTMLInputElement} */ (byId("max-bot-turns"));
    this.sampler = byId("sampler");
    this.breakNewline = /** @type {HTMLInputElement} */ (byId("break-newline"));
    this.seed = /** @type {HTMLInputElement} */ (byId("seed"));
    /** @type {Map<string, {range: HTMLInputElement, box: HTMLInputElement, spec: any}>} */
    this.fields = new Map();
    this.participantsKey = "";
    this.build();
  }

  build() {
    this.turnOrder.replaceChildren(...TURN_ORDERS.map((o) => h("option", { value: o.value, text: o.label })));
    this.fixedPrompt.addEventListener("change", () => this.actions.update({ fixed_prompt: this.fixedPrompt.value }));
    this.keepFixed.addEventListener("change", () => this.actions.update({ keep_fixed_prompt: this.keepFixed.checked }));
    this.template.addEventListener("change", () => this.actions.update({ template: this.template.value }));
    this.turnOrder.addEventListener("change", () => this.actions.update({ turn_order: this.turnOrder.value }));
    this.maxTurns.addEventListener("change", () => {
      const v = clampInt(this.maxTurns.value, 0, 16);
      if (v === null) return this.render(true);
      this.maxTurns.value = String(v);
      this.actions.update({ max_bot_turns: v });
    });
    this.breakNewline.addEventListener("change", () => this.setting("break_on_newline", this.breakNewline.checked));
    this.seed.addEventListener("change", () => {
      const raw = this.seed.value.trim();
      if (!raw) return this.setting("seed", null);
      const v = clampInt(raw, 0, 2 ** 32 - 1);
      if (v === null) return this.render(true);
      this.seed.value = String(v);
      this.setting("seed", v);
    });
    byId("reset-sampler").addEventListener("click", () => {
      const reset = Object.fromEntries([...SAMPLER_FIELDS.map((f) => f.key), "break_on_newline", "seed"].map((k) => [k, null]));
      this.actions.update({ settings: reset });
    });
    byId("add-bot").addEventListener("click", () => this.addParticipant("bot"));
    byId("add-user").addEventListener("click", () => this.addParticipant("user"));

    for (const spec of SAMPLER_FIELDS) {
      const id = `set-${spec.key}`;
      const range = /** @type {HTMLInputElement} */ (h("input", { type: "range", min: String(spec.min),
        max: String(spec.sliderMax ?? spec.max), step: String(spec.step), attrs: { "aria-label": spec.label } }));
      const box = /** @type {HTMLInputElement} */ (h("input", { type: "number", id, className: "num",
        min: String(spec.min), max: String(spec.max), step: String(spec.step), inputMode: spec.int ? "numeric" : "decimal" }));
      range.addEventListener("input", () => { box.value = range.value; });
      range.addEventListener("change", () => this.setting(spec.key, this.parse(spec, range.value)));
      box.addEventListener("change", () => {
        const v = this.parse(spec, box.value);
        if (v === null) return this.render(true);
        box.value = String(v);
        range.value = String(v);
        this.setting(spec.key, v);
      });
      this.fields.set(spec.key, { range, box, spec });
      this.sampler.append(h("div", { className: "field slider", dataset: { setting: spec.key } },
        h("div", { className: "field-top" }, h("label", { htmlFor: id, text: spec.label }), box),
        range,
        spec.hint ? h("div", { className: "hint", text: spec.hint }) : null));
    }
  }

  /** @returns {number | null} */
  parse(spec, raw) {
    const n = Number(raw);
    if (raw === "" || !Number.isFinite(n)) {
      this.actions.toast(`${spec.label}: enter a number from ${spec.min} to ${spec.max}`);
      return null;
    }
    let v = Math.min(spec.max, Math.max(spec.min, n));
    v = spec.int ? Math.round(v) : Math.round(v * 1000) / 1000;
    return v;
  }

  setting(key, value) {
    this.actions.update({ settings: { [key]: value } });
  }

  /** @param {"bot" | "user"} kind */
  addParticipant(kind) {
    const s = this.state.session;
    if (!s) return;
    if (s.participants.length >= (this.state.limits?.participants_max ?? 16)) {
      this.actions.toast("A session can have at most 16 participants.");
      return;
    }
    const taken = new Set(s.participants.map((p) => p.name.toLowerCase()));
    const base = kind === "bot" ? "Bot" : "User";
    let n = s.participants.filter((p) => p.kind === kind).length + 1;
    while (taken.has(`${base} ${n}`.toLowerCase())) n++;
    const nBots = s.participants.filter((p) => p.kind === "bot").length;
    const color = kind === "bot" ? BOT_COLORS[nBots % BOT_COLORS.length] : "#6a9fd4";
    this.sendParticipants([...s.participants, { name: `${base} ${n}`, kind, persona: "", settings: {}, color }]);
  }

  /** @param {any[]} list */
  sendParticipants(list) {
    this.participantsKey = "";   // redraw from the answer, whatever it is
    this.actions.update({ participants: list.map((p) => {
      const out = { name: p.name, kind: p.kind, persona: p.persona ?? "", settings: p.settings ?? {},
        color: longColor(p.color) };
      // Only when known (left out, the server keeps a bot's adapter).
      if ("lora" in p) out.lora = p.lora ?? null;
      return out;
    }) });
  }

  renderParticipants(force) {
    const s = this.state.session;
    const list = s ? s.participants : [];
    const key = JSON.stringify(list);
    if (!force && key === this.participantsKey) return;
    if (!force && this.participants.contains(document.activeElement)) return;   // the user is typing here
    this.participantsKey = key;
    const users = list.filter((p) => p.kind === "user").length;
    const bots = list.length - users;
    this.participants.replaceChildren(...list.map((p, i) => {
      const update = (changes) => this.sendParticipants(list.map((q, j) => (j === i ? { ...q, ...changes } : q)));
      const color = /** @type {HTMLInputElement} */ (h("input", { type: "color", className: "swatch", value: longColor(p.color),
        title: `Colour of ${p.name}`, attrs: { "aria-label": `Colour of ${p.name}` } }));
      color.addEventListener("change", () => update({ color: color.value }));
      const name = /** @type {HTMLInputElement} */ (h("input", { className: "p-name", value: p.name, maxLength: 120,
        attrs: { "aria-label": `Name of participant ${i + 1}` } }));
      name.addEventListener("change", () => {
        const v = name.value.replace(/\s+/g, " ").trim();
        const clash = list.some((q, j) => j !== i && q.name.toLowerCase() === v.toLowerCase());
        if (!v || clash) {
          this.actions.toast(v ? `There is already a participant named “${v}”.` : "A name cannot be empty.");
          name.value = p.name;
          return;
        }
        update({ name: v });
      });
      name.addEventListener("keydown", (e) => { if (e.key === "Enter") name.blur(); });
      const canRemove = list.length > 2 && (p.kind === "user" ? users > 1 : bots > 1);
      const remove = iconButton("trash", `Remove ${p.name}`, () => this.sendParticipants(list.filter((_, j) => j !== i)), "danger p-remove");
      /** @type {HTMLButtonElement} */ (remove).disabled = !canRemove;
      const row = h("div", { className: `participant ${p.kind}`, dataset: { name: p.name } },
        h("div", { className: "p-top" }, color, name, h("span", { className: `kind ${p.kind}`, text: p.kind }), remove));
      const adapters = this.state.model?.adapters ?? [];
      if (p.kind === "bot" && adapters.length) {
        const lora = /** @type {HTMLSelectElement} */ (h("select", { className: "p-lora", title: `LoRA adapter of ${p.name}`,
          attrs: { "aria-label": `LoRA adapter of ${p.name}` } },
        h("option", { value: "", text: "No LoRA adapter" }),
        ...adapters.map((a) => h("option", { value: a, text: `LoRA: ${a}` }))));
        lora.value = "lora" in p ? (p.lora ?? "") : "";
        lora.addEventListener("change", () => update({ lora: lora.value || null }));
        row.append(lora);
      }
      if (p.kind === "bot") {
        const persona = /** @type {HTMLTextAreaElement} */ (h("textarea", { className: "p-persona", value: p.persona ?? "",
          rows: 2, placeholder: `Persona prompt for ${p.name} (optional)`, attrs: { "aria-label": `Persona of ${p.name}` } }));
        persona.addEventListener("change", () => update({ persona: persona.value }));
        row.append(persona);
      }
      return row;
    }));
  }

  /** @param {boolean} [force]  also overwrite the field that has the focus (after a refused value) */
  render(force = false) {
    this.renderModel();
    const s = this.state.session;
    this.root.classList.toggle("disabled", !s);
    if (!s) return;
    const focus = document.activeElement;
    const set = (el, fn) => { if (force || el !== focus) fn(); };
    set(this.fixedPrompt, () => { this.fixedPrompt.value = s.fixed_prompt; });
    set(this.keepFixed, () => { this.keepFixed.checked = s.keep_fixed_prompt; });
    set(this.template, () => { this.template.value = s.template; });
    set(this.turnOrder, () => { this.turnOrder.value = s.turn_order; });
    set(this.maxTurns, () => { this.maxTurns.value = String(s.max_bot_turns); });
    set(this.breakNewline, () => { this.breakNewline.checked = !!s.settings.break_on_newline; });
    set(this.seed, () => { this.seed.value = s.settings.seed == null ? "" : String(s.settings.seed); });
    for (const [key, { range, box }] of this.fields) {
      const v = s.settings[key];
      if (v === undefined) continue;
      set(box, () => { box.value = String(v); });
      set(range, () => { range.value = String(v); });
    }
    const fmt = s.context?.format;
    this.template.title = fmt ? `Prompt format in use: ${fmt}` : "";
    this.renderParticipants(force);
  }

  renderModel() {
    const m = this.state.model;
    if (!m) return;
    const rows = [
      ["Model", m.name ?? "none"],
      ["Device", [m.device, m.dtype].filter(Boolean).join(" · ")],
      ["Context", m.max_seq_len ? `${m.max_seq_len.toLocaleString()} tokens` : "—"],
      ["Vocabulary", m.vocab_size ? m.vocab_size.toLocaleString() : "—"],
      ["Chat template", m.chat_template ? "yes" : "no"],
    ];
    if (m.adapters?.length) rows.push(["LoRA adapters", m.adapters.join(", ")]);
    this.modelInfo.replaceChildren(...rows.flatMap(([k, v]) => [h("dt", { text: k }), h("dd", { text: String(v), title: String(v) })]));
  }
}

/** @returns {number | null} */
function clampInt(raw, lo, hi) {
  const n = Number(raw);
  if (raw === "" || !Number.isFinite(n)) return null;
  return Math.min(hi, Math.max(lo, Math.round(n)));
}
