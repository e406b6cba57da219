// cellgate demo page: one session, one WebSocket, one word per step; no build step, no external requests.
//
// The text box is the source of truth. Its completed words (everything before the last space) are
// reconciled with the words the session has consumed: new words are sent as steps, deleted words
// are undone with a rewind to the step before them. The word being typed is completed by the server
// from the model's whole vocabulary ({"prefix"}: a read that never advances the session). One message
// is in flight at a time and every message carries if_step, so resending it after a reconnect is
// applied exactly once.
"use strict";

const SUGGESTIONS = 5; // shown
const K = 20; // asked for after each word: enough to narrow by the first letters typed until the server's completion arrives
const PROBE_K = 50; // for the long-range answer (the server's default CELLGATE_MAX_K)
const WINDOW = 30; // words in the LSTM view
const UNITS = 24; // hidden units drawn per gate: the first 24
const MAX_BACKOFF_MS = 30000;

// Mirrors model/corpus.py (COUNTRY_LANGUAGE and the filler grammar), so the long-range example
// uses exactly the words the demo model was trained on.
const COUNTRY_LANGUAGE = [
  ["india", "hindi"], ["france", "french"], ["germany", "german"], ["spain", "spanish"],
  ["italy", "italian"], ["japan", "japanese"], ["china", "chinese"], ["russia", "russian"],
  ["brazil", "portuguese"], ["greece", "greek"], ["turkey", "turkish"], ["sweden", "swedish"],
  ["poland", "polish"], ["egypt", "arabic"], ["korea", "korean"], ["netherlands", "dutch"],
];
const FILLER = {
  subjects: ["we", "they", "my friend", "my sister", "the neighbour", "the teacher", "our team", "he", "she"],
  verbs: ["cooked", "painted", "found", "cleaned", "sold", "carried", "opened", "fixed", "watched", "bought"],
  adjectives: ["old", "small", "green", "quiet", "heavy", "bright", "cold", "warm", "tall", "simple"],
  nouns: ["table", "garden", "letter", "window", "bicycle", "river", "kitchen", "book", "bridge", "song"],
  times: ["today", "yesterday", "in the morning", "last week", "at night", "after lunch", "on sunday"],
  templates: [
    "{s} {v} the {a} {n} {t} .",
    "{s} {v} a {n} .",
    "the {n} was {a} {t} .",
    "{s} liked the {a} {n} .",
    "it was {a} {t} .",
    "{s} {v} the {n} and the {n2} .",
  ],
};
const LANGUAGES = new Set(COUNTRY_LANGUAGE.map(([, language]) => language));

const BANDS = [
  ["forget_gate", "f forget"],
  ["input_gate", "i input"],
  ["output_gate", "o output"],
  ["cell", "C cell"],
];
// Heatmap geometry in CSS pixels.
const CELL_W = 15;
const CELL_H = 4;
const LABEL_W = 66;
const BAND_GAP = 10;
const WORDS_H = 64;
const RIGHT_PAD = 40; // room for the slanted label of the newest word

const $ = (id) => document.getElementById(id);
const el = {
  text: $("text"),
  suggestions: $("suggestions"),
  notice: $("notice"),
  connection: $("connection"),
  model: $("model-version"),
  step: $("step"),
  latency: $("latency"),
  unknown: $("unknown"),
  reset: $("reset"),
  country: $("country"),
  gap: $("gap"),
  longrange: $("longrange"),
  result: $("longrange-result"),
  heatmaps: $("heatmaps"),
  hover: $("hover"),
  units: $("units"),
};

const apiKey = new URLSearchParams(location.search).get("api_key");

const state = {
  model: null, // GET /v1/model
  sessionId: null,
  ws: null,
  connected: false,
  step: 0,
  committed: [], // one entry per consumed word: {word, before, after} (steps before and after it)
  columns: [], // the LSTM view: one per token, {step, word, gates: {name: [L][H]} | null}
  predictions: [], // next words after the last step
  completion: null, // the server's completion of the word being typed: {partial, step, predictions}
  inFlight: null, // {kind, message, sentAt, ...}
  probe: null, // a pending long-range question: {resolve}
  tabMovesFocus: false, // after Esc, Tab leaves the text box (into the suggestions) instead of accepting
  attempt: 0, // reconnect attempts since the last success
  reconnectTimer: null,
  starting: false,
  explain: true, // off if the bundle has no explain graph
  maxK: PROBE_K, // lowered to the server's CELLGATE_MAX_K if it refuses a k
  waiters: [], // resolved when the session has consumed every completed word
};

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(method, path, body) {
  const headers = { "Content-Type": "application/json" };
  if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = response.status === 204 ? null : await response.json().catch(() => null);
  if (!response.ok) {
    throw new ApiError(response.status, data?.error?.code ?? "http_error", data?.error?.message ?? response.statusText);
  }
  return data;
}

// ----- messages to the user -------------------------------------------------------------------

function notice(text, kind = "info") {
  el.notice.hidden = !text;
  el.notice.textContent = text || "";
  el.notice.dataset.kind = kind;
}

function setConnection(name, text) {
  el.connection.dataset.state = name;
  el.connection.textContent = text;
}

// ----- session lifecycle ----------------------------------------------------------------------

async function start() {
  // (Re)establishes model info, a session and the socket; any failure goes to the backoff.
  if (state.starting) return;
  state.starting = true;
  clearTimeout(state.reconnectTimer);
  setConnection("connecting", "connecting…");
  try {
    state.model = await api("GET", "/v1/model");
    renderModel();
    if (!state.sessionId) await createSession();
    openSocket();
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      setConnection("closed", "unauthorized");
      notice("This server needs an API key: open the page as /?api_key=YOUR_KEY.", "error");
    } else {
      scheduleReconnect();
    }
  } finally {
    state.starting = false;
  }
}

async function createSession() {
  const reply = await api("POST", "/v1/sessions", { text: "", k: Math.min(K, state.maxK) });
  state.sessionId = reply.session_id;
  document.body.dataset.session = reply.session_id;
  state.step = reply.step;
  state.committed = [];
  state.columns = [];
  state.inFlight = null;
  state.predictions = reply.predictions;
  state.completion = null;
  renderAll();
}

function socketUrl(sessionId) {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const query = apiKey ? `?api_key=${encodeURIComponent(apiKey)}` : "";
  return `${scheme}://${location.host}/v1/sessions/${sessionId}/stream${query}`;
}

function openSocket() {
  const ws = new WebSocket(socketUrl(state.sessionId));
  state.ws = ws;
  ws.onopen = () => {
    if (ws !== state.ws) return;
    state.connected = true;
    state.attempt = 0;
    setConnection("open", "connected");
    if (el.notice.dataset.kind === "error") notice("");
    if (state.inFlight) {
      // The answer was lost with the old socket; the same if_step makes the resend exactly-once.
      state.inFlight.sentAt = performance.now();
      ws.send(JSON.stringify(state.inFlight.message));
    } else {
      pump();
    }
  };
  ws.onmessage = (event) => {
    if (ws === state.ws) onAnswer(JSON.parse(event.data));
  };
  ws.onclose = (event) => {
    if (ws !== state.ws) return; // a socket we replaced on purpose
    state.connected = false;
    state.ws = null;
    if (event.code === 4404) {
      sessionExpired();
    } else if (event.code === 4401) {
      setConnection("closed", "unauthorized");
      notice("The server refused the API key: open the page as /?api_key=YOUR_KEY.", "error");
    } else {
      scheduleReconnect();
    }
  };
}

function closeSocket() {
  const ws = state.ws;
  state.ws = null;
  state.connected = false;
  if (ws) ws.close(1000);
}

function scheduleReconnect() {
  state.attempt += 1;
  // Exponential backoff with jitter, so a restarted server is not hit by every page at once.
  const delay = Math.min(MAX_BACKOFF_MS, 1000 * 2 ** (state.attempt - 1)) * (0.75 + Math.random() * 0.5);
  setConnection("unreachable", "unreachable");
  notice(
    `The server is unreachable. Retrying in ${Math.ceil(delay / 1000)} s (attempt ${state.attempt}); ` +
      "your text is kept and will be resent.",
    "error",
  );
  clearTimeout(state.reconnectTimer);
  state.reconnectTimer = setTimeout(start, delay);
}

function sessionExpired() {
  // The server forgot the session (idle past its TTL, deleted, or restarted): replay the text in a new one.
  state.sessionId = null;
  state.inFlight = null;
  notice("Your session expired on the server, so a new one was started and your text replayed into it.", "warn");
  start();
}

function restart(message) {
  closeSocket();
  state.sessionId = null;
  state.inFlight = null;
  if (message) notice(message, "warn");
  start();
}

// ----- the reconcile loop ---------------------------------------------------------------------

function splitText(text) {
  // Completed words are those followed by whitespace; the rest is the word being typed.
  const match = /\s(?=\S*$)/.exec(text);
  const head = match ? text.slice(0, match.index + 1) : "";
  return { words: head.split(/\s+/).filter(Boolean), partial: text.slice(head.length) };
}

function send(op) {
  op.sentAt = performance.now();
  state.inFlight = op;
  document.body.dataset.synced = "false";
  state.ws.send(JSON.stringify(op.message));
}

function pump() {
  if (state.inFlight || !state.connected) return;
  const desired = splitText(el.text.value).words;
  const committed = state.committed;
  let same = 0;
  while (same < committed.length && same < desired.length && committed[same].word === desired[same]) same += 1;
  if (same < committed.length) {
    // Words were deleted or edited: back to the state before the first one that changed.
    const to = committed[same].before;
    send({ kind: "rewind", index: same, message: { rewind_to: to, k: Math.min(K, state.maxK), if_step: state.step } });
  } else if (same < desired.length) {
    const word = desired[same];
    const explain = state.explain && desired.length - same <= WINDOW;
    const message = { text: word, k: Math.min(K, state.maxK), if_step: state.step, explain };
    send({ kind: "step", word, before: state.step, message });
  } else if (state.probe) {
    send({ kind: "probe", message: { rewind_to: state.step, k: state.maxK, if_step: state.step } });
  } else if (needsCompletion()) {
    const partial = splitText(el.text.value).partial;
    send({ kind: "complete", partial, message: { prefix: partial, k: SUGGESTIONS, if_step: state.step } });
  } else {
    document.body.dataset.synced = "true";
    for (const resolve of state.waiters.splice(0)) resolve();
  }
}

function onAnswer(reply) {
  const op = state.inFlight;
  if (!op) return;
  if (reply.error) {
    onError(op, reply.error);
    return;
  }
  state.inFlight = null;
  el.latency.textContent = `${(performance.now() - op.sentAt).toFixed(1)} ms`;
  if (op.kind === "complete") {
    state.completion = { partial: op.partial, step: reply.step, predictions: reply.predictions };
    renderSuggestions();
    pump();
    return;
  }
  if (op.kind === "step") {
    state.committed.push({ word: op.word, before: op.before, after: reply.step });
    addColumns(op, reply);
    el.unknown.textContent = reply.unknown?.length
      ? `Not in the model's vocabulary (read as <unk>): ${reply.unknown.join(", ")}`
      : "";
  } else if (op.kind === "rewind") {
    state.committed.length = op.index;
    state.columns = state.columns.filter((column) => column.step <= reply.step);
  } else if (op.kind === "probe") {
    const probe = state.probe;
    state.probe = null;
    probe.resolve(reply.predictions);
  }
  state.step = reply.step;
  if (op.kind !== "probe") state.predictions = reply.predictions;
  renderAll();
  pump();
}

function onError(op, error) {
  const retry = (ms) => setTimeout(() => state.inFlight === op && state.connected && send(op), ms);
  switch (error.code) {
    case "session_not_found":
      break; // the server closes with 4404 next; onclose starts a new session
    case "history_exhausted":
      restart("That edit reaches further back than the server keeps history, so your text was replayed.");
      break;
    case "step_conflict":
      restart("The session changed elsewhere, so a new one was started and your text replayed.");
      break;
    case "overloaded":
    case "store_unavailable":
    case "rate_limited":
      notice(`The server is busy (${error.code}); retrying.`, "warn");
      retry(1000);
      break;
    case "validation_error":
      if (op.kind === "complete") {
        // A partial word the server cannot take as a prefix (e.g. longer than any word): nothing completes it.
        state.inFlight = null;
        state.completion = { partial: op.partial, step: state.step, predictions: [] };
        renderSuggestions();
        pump();
        break;
      }
      if (error.field === "k" && error.limit < op.message.k) {
        state.maxK = error.limit; // a server with a smaller CELLGATE_MAX_K
        op.message.k = error.limit;
        retry(0);
        break;
      }
      state.inFlight = null;
      notice(`The server refused "${op.word ?? op.kind}": ${error.message}`, "error");
      break;
    case "internal_error":
      if (op.message.explain) {
        state.explain = false; // e.g. a bundle without the explain graph: keep predicting without the view
        op.message.explain = false;
        retry(0);
        break;
      }
    // falls through
    default:
      state.inFlight = null;
      notice(`The server refused "${op.word ?? op.kind}": ${error.message}`, "error");
  }
}

function whenSynced() {
  return new Promise((resolve) => {
    state.waiters.push(resolve);
    pump();
  });
}

// ----- suggestions ----------------------------------------------------------------------------

function isSpecial(word) {
  return word.startsWith("<") && word.endsWith(">");
}

function needsCompletion() {
  // The word being typed has no completion from the server yet for this exact text at this step.
  const { partial } = splitText(el.text.value);
  const done = state.completion;
  return partial !== "" && !(done && done.partial === partial && done.step === state.step);
}

function suggestionsFor() {
  // What to show and where it came from: the server's completion of the word being typed, the next words
  // (nothing typed yet), or, while a completion is on its way, the last answer narrowed by the new letters.
  const { partial } = splitText(el.text.value);
  const done = state.completion && state.completion.step === state.step ? state.completion : null;
  if (partial === "") return { source: "next-word", items: state.predictions.filter((p) => !isSpecial(p.word)) };
  if (done && done.partial === partial) return { source: "completion", items: done.predictions };
  const typed = partial.toLowerCase();
  const base = done && typed.startsWith(done.partial.toLowerCase()) ? done.predictions : state.predictions;
  return { source: "narrowed", items: base.filter((p) => !isSpecial(p.word) && p.word.startsWith(typed)) };
}

function visibleSuggestions() {
  return suggestionsFor().items.slice(0, SUGGESTIONS);
}

function accept(word) {
  const { partial } = splitText(el.text.value);
  const text = el.text.value;
  el.text.value = `${text.slice(0, text.length - partial.length)}${word} `;
  el.text.focus();
  el.text.setSelectionRange(el.text.value.length, el.text.value.length);
  onTextChanged();
}

function renderSuggestions() {
  const { source, items: all } = suggestionsFor();
  const items = all.slice(0, SUGGESTIONS);
  el.suggestions.dataset.source = source;
  el.suggestions.dataset.partial = splitText(el.text.value).partial;
  el.suggestions.replaceChildren(
    ...items.map((p, index) => {
      const li = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.dataset.word = p.word;
      button.setAttribute("aria-label", `${p.word}, ${Math.round(p.prob * 100)} percent${index === 0 ? ", Tab" : ""}`);
      const word = document.createElement("span");
      word.className = "word";
      word.textContent = p.word;
      const prob = document.createElement("span");
      prob.className = "prob";
      prob.textContent = `${(p.prob * 100).toFixed(p.prob < 0.1 ? 1 : 0)}%`;
      const bar = document.createElement("span");
      bar.className = "meter";
      bar.style.setProperty("--p", String(p.prob));
      button.append(word, prob, bar);
      button.addEventListener("click", () => accept(p.word));
      li.append(button);
      return li;
    }),
  );
  el.suggestions.dataset.count = String(items.length);
}

// ----- the LSTM view --------------------------------------------------------------------------

function addColumns(op, reply) {
  const explain = reply.explain;
  if (explain && explain.words.length === reply.step - op.before) {
    explain.words.forEach((word, t) => {
      const gates = {};
      for (const [name] of BANDS) gates[name] = explain[name][t];
      state.columns.push({ step: op.before + t + 1, word, gates });
    });
  } else {
    // A replayed answer carries no gates: keep the words in place with empty columns.
    for (let step = op.before + 1; step <= reply.step; step += 1) state.columns.push({ step, word: op.word, gates: null });
  }
  if (state.columns.length > WINDOW) state.columns.splice(0, state.columns.length - WINDOW);
}

// Sequential colour map for gates in [0, 1] (viridis at five stops), diverging blue-white-red for C.
const GATE_STOPS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
function gateColor(v) {
  const x = Math.min(1, Math.max(0, v)) * (GATE_STOPS.length - 1);
  const i = Math.min(GATE_STOPS.length - 2, Math.floor(x));
  const t = x - i;
  const [a, b] = [GATE_STOPS[i], GATE_STOPS[i + 1]];
  return `rgb(${a.map((c, j) => Math.round(c + (b[j] - c) * t)).join(",")})`;
}
function cellColor(v, scale) {
  const x = Math.max(-1, Math.min(1, v / scale));
  const [r, g, b] = x < 0 ? [33, 102, 172] : [178, 24, 43];
  const t = Math.abs(x);
  return `rgb(${Math.round(255 + (r - 255) * t)},${Math.round(255 + (g - 255) * t)},${Math.round(255 + (b - 255) * t)})`;
}

function renderHeatmaps() {
  const model = state.model;
  if (!model) return;
  const units = Math.min(UNITS, model.hidden_size);
  el.units.textContent = String(units);
  const bandH = units * CELL_H;
  const width = LABEL_W + WINDOW * CELL_W + RIGHT_PAD;
  const height = BANDS.length * (bandH + BAND_GAP) + WORDS_H;
  const dpr = window.devicePixelRatio || 1;
  let cells = 0;
  const figures = [];
  for (let layer = 0; layer < model.layers; layer += 1) {
    const columns = state.columns;
    let scale = 0;
    for (const column of columns) {
      if (!column.gates) continue;
      for (let u = 0; u < units; u += 1) scale = Math.max(scale, Math.abs(column.gates.cell[layer][u]));
    }
    scale = scale || 1;
    const canvas = document.createElement("canvas");
    canvas.width = width * dpr;
    canvas.height = height * dpr;
    canvas.style.width = `${width}px`;
    canvas.style.height = `${height}px`;
    canvas.dataset.layer = String(layer);
    canvas.dataset.scale = String(scale);
    const ctx = canvas.getContext("2d");
    ctx.scale(dpr, dpr);
    ctx.font = "12px system-ui, sans-serif";
    ctx.textBaseline = "middle";
    BANDS.forEach(([name, label], band) => {
      const top = band * (bandH + BAND_GAP);
      ctx.fillStyle = "#334";
      ctx.fillText(label, 4, top + bandH / 2);
      ctx.fillStyle = "#eceff4";
      ctx.fillRect(LABEL_W, top, WINDOW * CELL_W, bandH);
      columns.forEach((column, c) => {
        if (!column.gates) return;
        const values = column.gates[name][layer];
        for (let u = 0; u < units; u += 1) {
          ctx.fillStyle = name === "cell" ? cellColor(values[u], scale) : gateColor(values[u]);
          ctx.fillRect(LABEL_W + c * CELL_W, top + u * CELL_H, CELL_W - 1, CELL_H);
          cells += 1;
        }
      });
    });
    // The word under each column, slanted to fit.
    const wordsTop = BANDS.length * (bandH + BAND_GAP);
    ctx.fillStyle = "#223";
    ctx.textBaseline = "middle";
    columns.forEach((column, c) => {
      ctx.save();
      ctx.translate(LABEL_W + c * CELL_W + CELL_W / 2, wordsTop + 2);
      ctx.rotate(Math.PI / 3);
      ctx.fillText(column.word.length > 10 ? `${column.word.slice(0, 9)}…` : column.word, 0, 0);
      ctx.restore();
    });
    if (columns.length) {
      // Outline the newest column.
      ctx.strokeStyle = "#d14";
      ctx.lineWidth = 1.5;
      ctx.strokeRect(LABEL_W + (columns.length - 1) * CELL_W - 0.5, -0.5 + 1, CELL_W, wordsTop - BAND_GAP);
    }
    const words = columns.map((column) => column.word).join(" ");
    canvas.setAttribute("role", "img");
    canvas.setAttribute(
      "aria-label",
      `Layer ${layer + 1}: forget, input and output gates and memory cell of the first ${units} units ` +
        `over the last ${columns.length} words: ${words}`,
    );
    canvas.addEventListener("mousemove", (event) => describeCell(event, canvas, layer, units, scale));
    const figure = document.createElement("figure");
    const caption = document.createElement("figcaption");
    caption.textContent = `Layer ${layer + 1} · C scale ±${scale.toFixed(2)}`;
    figure.append(caption, canvas);
    figures.push(figure);
  }
  el.heatmaps.replaceChildren(...figures);
  el.heatmaps.dataset.cells = String(cells);
  el.heatmaps.dataset.columns = String(state.columns.length);
}

const BAND_NAMES = {
  forget_gate: "forget gate f",
  input_gate: "input gate i",
  output_gate: "output gate o",
  cell: "memory cell C",
};

function describeCell(event, canvas, layer, units, scale) {
  const rect = canvas.getBoundingClientRect();
  const x = event.clientX - rect.left - LABEL_W;
  const y = event.clientY - rect.top;
  const c = Math.floor(x / CELL_W);
  const band = Math.floor(y / (units * CELL_H + BAND_GAP));
  const u = Math.floor((y - band * (units * CELL_H + BAND_GAP)) / CELL_H);
  const column = state.columns[c];
  if (x < 0 || !column || !column.gates || band >= BANDS.length || u < 0 || u >= units) return;
  const name = BANDS[band][0];
  const value = column.gates[name][layer][u];
  const extra = name === "cell" ? ` (colour scale ±${scale.toFixed(2)})` : "";
  el.hover.textContent =
    `Layer ${layer + 1}, ${BAND_NAMES[name]}, unit ${u}, after “${column.word}” (step ${column.step}): ` +
    `${value.toFixed(3)}${extra}`;
}

// ----- rendering ------------------------------------------------------------------------------

function renderModel() {
  const m = state.model;
  el.model.textContent = `${m.version} (${m.layers}×${m.hidden_size}, ${m.vocab_size} words)`;
  el.model.dataset.version = m.version;
}

function renderAll() {
  el.step.textContent = String(state.step);
  el.step.dataset.step = String(state.step);
  renderSuggestions();
  renderHeatmaps();
}

// ----- the long-range example -----------------------------------------------------------------

function pick(list) {
  return list[Math.floor(Math.random() * list.length)];
}

function fillerSentence() {
  const nouns = [...FILLER.nouns].sort(() => Math.random() - 0.5);
  return pick(FILLER.templates)
    .replace("{s}", pick(FILLER.subjects))
    .replace("{v}", pick(FILLER.verbs))
    .replace("{a}", pick(FILLER.adjectives))
    .replace("{n2}", nouns[1])
    .replace("{n}", nouns[0])
    .replace("{t}", pick(FILLER.times));
}

async function runLongRange() {
  const country = el.country.value;
  const expected = COUNTRY_LANGUAGE.find(([c]) => c === country)[1];
  const sentences = Math.max(0, Math.min(40, Number.parseInt(el.gap.value, 10) || 0));
  const filler = Array.from({ length: sentences }, fillerSentence);
  const text = [`i stay in ${country} .`, ...filler, "i speak"].join(" ");
  const gap = filler.join(" ").split(" ").filter(Boolean).length;
  el.longrange.disabled = true;
  el.result.dataset.language = "";
  el.result.textContent = `Feeding ${text.split(" ").length} words, one step each…`;
  el.text.value = `${text} `;
  el.text.scrollTop = el.text.scrollHeight;
  onTextChanged();
  try {
    await whenSynced();
    const predictions = await new Promise((resolve) => {
      state.probe = { resolve };
      pump();
    });
    const rank = predictions.findIndex((p) => LANGUAGES.has(p.word));
    if (rank < 0) {
      el.result.textContent = `No language among the top ${predictions.length} words after “i speak”.`;
      return;
    }
    const { word, prob } = predictions[rank];
    const verdict = word === expected ? "right" : `wrong: “${country}” means ${expected}`;
    el.result.dataset.language = word;
    el.result.dataset.correct = String(word === expected);
    el.result.replaceChildren();
    const strong = document.createElement("strong");
    strong.textContent = word;
    el.result.append(
      "Predicted language: ",
      strong,
      ` (p = ${prob.toFixed(3)}, rank ${rank + 1}) — ${verdict}, ${gap} filler words after “${country}”.`,
    );
  } finally {
    el.longrange.disabled = false;
  }
}

// ----- events ---------------------------------------------------------------------------------

function onTextChanged() {
  renderSuggestions();
  pump();
}

el.text.addEventListener("input", () => {
  state.tabMovesFocus = false;
  onTextChanged();
});
el.text.addEventListener("focus", () => {
  state.tabMovesFocus = false;
});
el.text.addEventListener("keydown", (event) => {
  const plain = !event.shiftKey && !event.altKey && !event.ctrlKey && !event.metaKey;
  if (event.key === "Tab" && plain && !state.tabMovesFocus) {
    const first = visibleSuggestions()[0];
    if (first) {
      event.preventDefault(); // keyboards accept with Tab; Esc first lets Tab move focus as usual
      accept(first.word);
    }
  } else if (event.key === "Escape") {
    state.tabMovesFocus = true;
  }
});
el.reset.addEventListener("click", () => {
  const old = state.sessionId;
  el.text.value = "";
  el.result.textContent = "";
  restart("");
  notice("");
  if (old) api("DELETE", `/v1/sessions/${old}`).catch(() => {}); // best effort: it expires anyway
  el.text.focus();
});
el.longrange.addEventListener("click", runLongRange);
for (const [country] of COUNTRY_LANGUAGE) el.country.append(new Option(country, country));

// Exposed for tests and the curious: the data the page keeps, never needed by the page itself.
window.cellgateDemo = { state, COUNTRY_LANGUAGE, FILLER, UNITS, WINDOW };

renderAll();
start();
