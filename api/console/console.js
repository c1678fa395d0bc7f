// The Ladder console: one page over the HTTP API (the same routes the CLI and the Python client
// use). No build step: plain browser JavaScript, uPlot for the charts.
"use strict";

const TERMINAL = ["succeeded", "failed", "cancelled"];
const KEY = "ladder-api-key"; // sessionStorage: the key lives as long as the tab
const COLORS = { loss: "#d9480f", validLoss: "#862e9c", accuracy: "#1c7ed6", macroF1: "#2b8a3e" };
// Event streams the jobs list keeps open: a browser opens at most 6 connections to one server
// over HTTP/1.1, and other tabs need some. Further active jobs are looked at again every 10 s.
const MAX_STREAMS = 3;
// The trainer's names of swept settings -> the hyperparameter names the form uses.
const SWEPT_NAMES = { lr: "learning_rate", reduction: "reduction_factor", seed: "seed" };

// ---- the API ----------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `the server answered ${status}`);
    this.status = status;
    this.code = error.code;
    this.param = error.param;
  }
}

function authHeaders() {
  const key = sessionStorage.getItem(KEY);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function api(path, options = {}) {
  const headers = { ...authHeaders(), ...(options.headers || {}) };
  let body = options.body;
  if (options.json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(options.json);
  }
  const response = await fetch(path, { method: options.method || "GET", headers, body });
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
  if (!response.ok) {
    const error = new ApiError(response.status, data);
    if (response.status === 401) askForKey(error.message);
    throw error;
  }
  return data;
}

// Server-sent events through fetch (EventSource cannot send the Authorization header).
// Calls onEvent for each event; resolves when the stream ends or `signal` aborts it.
async function followEvents(jobId, onEvent, signal, after = null) {
  const query = new URLSearchParams({ stream: "true" });
  if (after) query.set("after", after);
  const response = await fetch(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/events?${query}`,
    { headers: authHeaders(), signal });
  if (!response.ok) {
    let data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    throw new ApiError(response.status, data);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const chunk = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = chunk.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (data === "[DONE]") return;
      if (data) onEvent(JSON.parse(data));
    }
  }
}

// ---- small helpers ----------------------------------------------------------------------

const $ = (selector, root = document) => root.querySelector(selector);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "onclick") node.addEventListener("click", value);
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

function showError(target, error) {
  const node = typeof target === "string" ? $(target) : target;
  if (!node) return;
  node.textContent = error ? (error.message || String(error)) : "";
}

const when = (seconds) => (seconds ? new Date(seconds * 1000).toLocaleString() : "");
const percent = (x) => (typeof x === "number" ? `${(100 * x).toFixed(1)}%` : "");
const decimal = (x) => (typeof x === "number" ? x.toFixed(3) : "");
// A job's (or a model's) headline test figure: a classifier's accuracy, a generative network's
// exact match.
const testScore = (r) => (!r ? "" : r.task !== "generate" ? percent(r.test_accuracy)
  : typeof r.test_exact_match === "number" ? `${percent(r.test_exact_match)} exact match` : "");

// A span of seconds as a person reads it: "45 s", "3 min 20 s", "2 h 5 min".
function duration(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

// Every item of a paged list (`after` cursor, `has_more`), 100 a request.
async function allPages(path) {
  const items = [];
  let after = null;
  for (;;) {
    const page = await api(`${path}?limit=100${after ? `&after=${encodeURIComponent(after)}` : ""}`);
    items.push(...page.data);
    if (!page.has_more || !page.data.length) return items;
    after = page.data[page.data.length - 1].id;
  }
}

// What a generation file holds, by its `kind`.
const GENERATION_KINDS = { chat: "chats", completion: "prompt/completion pairs", mixed: "chats and prompt/completion pairs" };

// What an upload trains: a generation file's rows, or a classification file's classes.
function fileSummary(file) {
  if (file.task === "generation") {
    return `generation file of ${GENERATION_KINDS[file.kind] || file.kind} (needs a decoder-only or T5 backbone)`;
  }
  return labelSummary(file);
}

// A file's classes: all of them, or those the server lists and how many it left out.
function labelSummary(file) {
  const more = file.n_labels - file.labels.length;
  const listed = [...file.labels, ...(more ? [`and ${more.toLocaleString()} more`] : [])];
  return `${file.n_labels.toLocaleString()} labels: ${listed.join(", ")}`;
}

// An uploaded file's name (its id where the file is gone), asked for once per id.
const fileNames = new Map();
function fileName(id) {
  if (!fileNames.has(id)) {
    fileNames.set(id, api(`/v1/files/${encodeURIComponent(id)}`).then((f) => f.filename, () => null));
  }
  return fileNames.get(id);
}

function statusBadge(status) {
  return el("span", { class: `status status-${status}`, "data-status": status, text: status.replace(/_/g, " ") });
}

// What the user typed in a hyperparameter field -> its JSON value ("" -> auto). `hp` is the
// setting as GET /v1/fine_tuning/hyperparameters describes it: a list-valued setting (kept
// layers) always gets a list, a sweepable one a list when several values are typed.
function parseValue(text, hp) {
  const t = text.trim();
  if (t === "") return undefined;
  const items = t.replace(/^\[|\]$/g, "").split(",").map((x) => x.trim()).filter(Boolean);
  const one = (x) => { try { return JSON.parse(x); } catch (e) { return x; } };
  if (Array.isArray(hp.value) && !["all", "auto"].includes(t)) return items.map(one);
  if (hp.sweep && items.length > 1) return items.map(one);
  return one(items.length === 1 ? items[0] : t);
}

const show = (value) => (Array.isArray(value) ? value.join(", ") : String(value));
// A job's resolved setting: null is one that each configuration of a sweep resolves for itself
// (side heads over several reduction factors).
const showSetting = (value) => (value === null ? "each configuration's own" : show(value));

// ---- the API key ------------------------------------------------------------------------

function askForKey(message) {
  $("#key-panel").hidden = false;
  showError("#key-error", message ? { message } : null);
  $("#key-input").focus();
}

function setupKey() {
  $("#key-button").addEventListener("click", () => askForKey(""));
  $("#key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY, $("#key-input").value.trim());
    $("#key-input").value = "";
    $("#key-panel").hidden = true;
    route();
  });
  $("#key-forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    $("#key-panel").hidden = true;
    route();
  });
}

async function showServer() {
  let ready = false;
  try {
    const response = await fetch("/ready");
    const body = await response.json();
    ready = response.ok;
    $("#server").textContent = ready ? `ready · ${body.backbones.join(", ")}`
      : `not ready: ${(body.error && body.error.message) || "backbones still loading"}`;
  } catch (e) {
    $("#server").textContent = "server unreachable";
  }
  if (!ready) setTimeout(showServer, 3000);
}

// ---- views ------------------------------------------------------------------------------

// A list a view shows (its `data`), or null when it could not be had (the error is then shown
// in the view) or the view was left meanwhile.
async function listForView(path, errorSelector, signal) {
  try {
    const list = await api(path);
    return signal.aborted ? null : list.data;
  } catch (error) {
    if (!signal.aborted) showError(errorSelector, error);
    return null;
  }
}

let leaving = new AbortController(); // aborted when the view changes: closes its event streams

function mount(templateId, nav) {
  leaving.abort();
  leaving = new AbortController();
  const view = $("#view");
  view.replaceChildren($(`#${templateId}`).content.cloneNode(true));
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("active", link.dataset.nav === nav);
  }
  return view;
}

async function newJobView() {
  mount("tpl-new", "new");
  const signal = leaving.signal;
  const input = $("#file-input");
  const drop = $("#drop");
  let file = null;
  let described = {}; // hyperparameter name -> its description from the server

  async function useFile(record) {
    file = record;
    const card = $("#file-card");
    card.hidden = false;
    card.dataset.task = record.task || "classification";
    card.replaceChildren(
      el("b", { text: record.filename }),
      ` · ${record.rows.toLocaleString()} rows · ${fileSummary(record)} · `,
      el("code", { text: record.id }),
    );
    $("#job-form").hidden = false;
    await loadHyperparameters();
  }

  async function upload(chosen) {
    showError("#upload-error", null);
    drop.classList.add("busy");
    const form = new FormData();
    form.append("purpose", "fine-tune");
    form.append("file", chosen, chosen.name);
    try {
      await useFile(await api("/v1/files", { method: "POST", body: form }));
    } catch (error) {
      showError("#upload-error", error);
    } finally {
      drop.classList.remove("busy");
      input.value = "";
    }
  }

  let asked = 0; // only the answer to the latest question fills the table
  async function loadHyperparameters() {
    if (!file || !$("#backbone").value) return;
    showError("#job-error", null);
    const table = $("#hp-table");
    const tbody = $("#hp-table tbody");
    const question = ++asked;
    try {
      const query = new URLSearchParams({ model: $("#backbone").value, training_file: file.id });
      const list = await api(`/v1/fine_tuning/hyperparameters?${query}`);
      if (question !== asked || signal.aborted) return;
      described = Object.fromEntries(list.data.map((hp) => [hp.name, hp]));
      const typed = {}; // what the user typed stays when the defaults change
      for (const field of tbody.querySelectorAll("[data-hp]")) typed[field.dataset.hp] = field.value;
      table.dataset.model = list.model;
      table.dataset.file = list.training_file;
      tbody.replaceChildren(...list.data.map((hp) => {
        let field;
        if (hp.choices) {
          field = el("select", { "data-hp": hp.name, id: `hp-${hp.name}` },
            el("option", { value: "", text: `${show(hp.value)} (default)` }),
            hp.choices.map((c) => el("option", { value: String(c), text: String(c) })));
        } else {
          field = el("input", { "data-hp": hp.name, id: `hp-${hp.name}`, placeholder: show(hp.value) });
        }
        if (typed[hp.name]) field.value = typed[hp.name];
        return el("tr", {},
          el("th", {}, el("label", { for: `hp-${hp.name}`, text: hp.name })),
          el("td", {}, field),
          el("td", { class: "muted", text: hp.description }));
      }));
    } catch (error) {
      showError("#job-error", error);
    }
  }

  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); }
  });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) upload(e.dataTransfer.files[0]);
  });
  input.addEventListener("change", () => { if (input.files.length) upload(input.files[0]); });
  $("#backbone").addEventListener("change", loadHyperparameters);

  $("#job-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    showError("#job-error", null);
    for (const bad of document.querySelectorAll(".invalid")) bad.classList.remove("invalid");
    const hyperparameters = {};
    for (const field of document.querySelectorAll("[data-hp]")) {
      const value = parseValue(field.value, described[field.dataset.hp]);
      if (value !== undefined) hyperparameters[field.dataset.hp] = value;
    }
    const body = { model: $("#backbone").value, training_file: file.id, hyperparameters };
    if ($("#suffix").value.trim()) body.suffix = $("#suffix").value.trim();
    if ($("#seed").value !== "") body.seed = Number($("#seed").value);
    $("#create-job").disabled = true;
    try {
      const job = await api("/v1/fine_tuning/jobs", { method: "POST", json: body });
      location.hash = `#/jobs/${job.id}`;
    } catch (error) {
      showError("#job-error", error);
      const name = (error.param || "").replace(/^hyperparameters\./, "").split(".")[0];
      const field = $(`#hp-${CSS.escape(name)}`) || $(`#${CSS.escape(name === "model" ? "backbone" : name)}`);
      if (field) field.classList.add("invalid");
    } finally {
      $("#create-job").disabled = false;
    }
  });

  try {
    const [models, files] = await Promise.all([api("/v1/models"), allPages("/v1/files")]);
    if (signal.aborted) return;
    $("#backbone").replaceChildren(...models.data.filter((m) => m.kind === "backbone")
      .map((m) => el("option", { value: m.id, text: m.id })));
    const select = $("#file-select");
    for (const f of files) {
      select.append(el("option", { value: f.id, text: `${f.filename} (${f.rows} rows, ${f.id})` }));
    }
    select.addEventListener("change", () => {
      const chosen = files.find((f) => f.id === select.value);
      if (chosen) useFile(chosen);
    });
    await loadHyperparameters(); // a file uploaded before the backbones were listed

  } catch (error) {
    showError("#upload-error", error);
  }
}

async function jobsView() {
  mount("tpl-jobs", "jobs");
  const signal = leaving.signal;
  const jobs = await listForView("/v1/fine_tuning/jobs?limit=100", "#jobs-error", signal);
  if (!jobs) return;
  $("#jobs-empty").hidden = jobs.length > 0;
  const tbody = $("#jobs-table tbody");
  let followed = 0;
  for (const job of jobs) {
    const status = el("td", {}, statusBadge(job.status));
    const accuracy = el("td", { text: testScore(job.result) });
    const macroF1 = el("td", { text: decimal(job.result && job.result.test_macro_f1) });
    const model = el("td", {}, job.fine_tuned_model ? el("code", { text: job.fine_tuned_model }) : "");
    tbody.append(el("tr", { "data-job": job.id },
      el("td", {}, el("a", { href: `#/jobs/${job.id}`, text: job.id })),
      el("td", { text: job.model }), status, el("td", { text: when(job.created_at) }), model, accuracy,
      macroF1));
    if (!TERMINAL.includes(job.status) && followed++ >= MAX_STREAMS) {
      // More active jobs than streams this page opens (the server caps them): look again soon.
      if (followed === MAX_STREAMS + 1) setTimeout(() => { if (!signal.aborted) jobsView(); }, 10_000);
    } else if (!TERMINAL.includes(job.status)) {
      // Live status: the job's event stream says each change as it happens.
      followEvents(job.id, (event) => {
        if (event.data && event.data.status) status.replaceChildren(statusBadge(event.data.status));
      }, signal).then(async () => {
        if (signal.aborted) return;
        const done = await api(`/v1/fine_tuning/jobs/${job.id}`);
        status.replaceChildren(statusBadge(done.status));
        accuracy.textContent = testScore(done.result);
        macroF1.textContent = decimal(done.result && done.result.test_macro_f1);
        if (done.fine_tuned_model) model.replaceChildren(el("code", { text: done.fine_tuned_model }));
      }).catch((error) => { if (!signal.aborted) showError("#jobs-error", error); });
    }
  }
}

// The curves of a classifier's epochs and of a generative network's (an epoch that reports
// `valid_loss`, as the server tells them apart): losses on the left axis, figures in [0, 1] on
// the right. Each line: [the epoch's key, label, colour, format of a figure in [0, 1]].
const CURVES = {
  classify: {
    left: "train loss",
    lines: [["train_loss", "train loss", COLORS.loss],
      ["val_accuracy", "validation accuracy", COLORS.accuracy, percent],
      ["val_macro_f1", "validation macro-F1", COLORS.macroF1, decimal]],
  },
  generate: {
    left: "loss",
    lines: [["train_loss", "train loss", COLORS.loss],
      ["valid_loss", "validation loss", COLORS.validLoss],
      ["valid_mean_token_accuracy", "validation token accuracy", COLORS.accuracy, percent]],
  },
};
const isGenerative = (epoch) => epoch.valid_loss !== undefined;

function drawChart(node, epochs) {
  const curves = CURVES[isGenerative(epochs[0]) ? "generate" : "classify"];
  const x = epochs.map((r) => r.epoch);
  const series = (key) => epochs.map((r) => (typeof r[key] === "number" ? r[key] : null));
  node.replaceChildren();
  node.dataset.epochs = String(epochs.length);
  const width = Math.max(320, node.clientWidth || 560);
  const options = {
    width, height: 260,
    scales: { x: { time: false }, val: { range: [0, 1] } },
    series: [
      { label: "epoch" },
      ...curves.lines.map(([, label, stroke, format]) => (format
        ? { label, stroke, width: 2, scale: "val", points: { size: 7 }, value: (u, v) => format(v) }
        : { label, stroke, width: 2, points: { size: 7 } })),
    ],
    axes: [
      { label: "epoch", incrs: [1, 2, 5, 10, 20, 50] },
      { label: curves.left, stroke: COLORS.loss },
      { label: "validation", side: 1, scale: "val",
        values: (u, ticks) => ticks.map((t) => t.toFixed(1)) },
    ],
  };
  return new uPlot(options, [x, ...curves.lines.map(([key]) => series(key))], node);
}

// Generations beside their references (an epoch's samples, the test split's first examples):
// the prompt's end (the whole of it on hover), the reference, what the model wrote.
function generationRows(list) {
  const tail = (text) => (text.length > 80 ? `…${text.slice(-80)}` : text);
  return list.map((g) => el("tr", { class: g.completion.trim() === g.reference.trim() ? "hit" : "" },
    el("td", { class: "prompt", title: g.prompt, text: tail(g.prompt) }),
    el("td", { class: "reference", text: g.reference }),
    el("td", { class: "completion", text: g.completion })));
}

// A generative job's test split: exact match and loss, then its first examples.
function generationEvaluation(result) {
  $("#generation-card").hidden = false;
  const test = result.test;
  $("#generation-test").replaceChildren(test
    ? el("tr", { "data-split": "test" },
      el("td", { text: test.n.toLocaleString() }),
      el("td", {}, el("b", { class: "exact-match", text: percent(test.exact_match) })),
      el("td", { class: "loss", text: decimal(test.loss) }),
      el("td", { text: test.tokens.toLocaleString() }))
    : el("tr", {}, el("td", { colspan: 4, class: "muted", text: "no rows: the file's split is empty" })));
  $("#test-examples tbody").replaceChildren(...generationRows(test ? test.examples : []));
}

// One split's report (the job's `result.test`, `.validation`): its row of the figures table.
function splitRow(name, report) {
  if (!report) {
    return el("tr", { "data-split": name }, el("th", { text: name }),
      el("td", { colspan: 6, class: "muted", text: "no rows: the file's split is empty" }));
  }
  return el("tr", { "data-split": name },
    el("th", { text: name }),
    el("td", { text: report.n.toLocaleString() }),
    el("td", {}, el("b", { text: percent(report.accuracy) })),
    el("td", {}, el("b", { class: "macro-f1", text: decimal(report.macro_f1) })),
    el("td", { text: report.majority_label }),
    el("td", { class: "majority-rate", text: percent(report.majority_rate) }),
    el("td", { text: decimal(report.majority_macro_f1) }));
}

// What accuracy alone hides: both splits against the majority class, then per class and the
// confusion matrix of the test split (the validation split's where there are no test rows).
function evaluation(result) {
  const splits = [["test", result.test], ["validation", result.validation]];
  if (result.validation_file) splits.push(["validation file", result.validation_file]);
  $("#splits tbody").replaceChildren(...splits.map(([name, report]) => splitRow(name, report)));
  const [name, report] = result.test ? splits[0] : splits[1];
  $("#evaluation-card").hidden = false;
  if (!report) return;
  $("#per-class-title").textContent = `Per class, ${name} split`;
  $("#per-class").replaceChildren(
    el("thead", {}, el("tr", {}, ["class", "precision", "recall", "F1", "rows", "predicted"]
      .map((h) => el("th", { text: h })))),
    el("tbody", {}, Object.entries(report.per_class).map(([label, c]) => el("tr", { "data-label": label },
      el("th", { text: label }), el("td", { text: decimal(c.precision) }),
      el("td", { text: decimal(c.recall) }), el("td", { text: decimal(c.f1) }),
      el("td", { text: String(c.support) }), el("td", { text: String(c.predicted) })))));
  const most = Math.max(1, ...report.confusion_matrix.flat());
  $("#confusion").dataset.split = name;
  $("#confusion").replaceChildren(
    el("thead", {}, el("tr", {}, el("th", { text: "" }), report.labels.map((l) => el("th", { text: l })))),
    el("tbody", {}, report.confusion_matrix.map((row, t) => el("tr", {},
      el("th", { text: report.labels[t] }),
      row.map((count, p) => el("td", {
        text: String(count),
        style: `background: rgba(${t === p ? "43, 138, 62" : "201, 42, 42"}, ${(0.6 * count / most).toFixed(3)})`,
      }))))));
}

function attempts(list) {
  $("#attempts-card").hidden = false;
  $("#attempts tbody").replaceChildren(...list.map((a, k) => el("tr", {},
    el("td", { text: k === 0 ? "first" : `retry ${k}` }),
    el("td", { text: String(Number(a.lr.toPrecision(3))) }),
    el("td", { text: String(a.seed) }), el("td", { text: percent(a.val_accuracy) }),
    el("td", { text: decimal(a.val_macro_f1) }),
    el("td", { class: a.collapsed ? "bad" : "", text: a.collapsed ? `yes: ${a.collapsed}` : "no" }))));
}

// The latest count of the job's long work (a progress event: its phase, and the server's words
// for the stage, done/total and the time left), and whether the job has ended since.
function progress(event, status) {
  const data = event.data;
  $("#progress").hidden = false;
  $("#progress").dataset.step = data.step;
  $("#progress").dataset.ended = TERMINAL.includes(status) ? status : "";
  $("#progress-phase").textContent = data.step;
  // The message names the stage first ("probe fit: 110/1000, ..."): once where it is the phase.
  $("#progress-stage").textContent = data.stage === data.step
    ? event.message.slice(data.stage.length + 1).trim() : event.message;
  const bar = $("#progress-bar");
  bar.max = Math.max(1, data.total);
  bar.value = data.done;
}

async function jobView(jobId) {
  mount("tpl-job", "jobs");
  const signal = leaving.signal;
  $("#job-id").textContent = jobId;
  let epochs = [];
  let attempt = 0; // the training attempt the chart shows: a retry starts a curve of its own
  let chart = null;
  let shown = null; // the job as last asked for
  let counted = null; // the latest progress event
  let streamed = false; // the events so far have been read (a job that has ended: all of them)
  const url = `/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}`;

  function details(job) {
    shown = job;
    $("#job-status").replaceChildren(statusBadge(job.status));
    $("#cancel-job").hidden = TERMINAL.includes(job.status);
    const file = el("span", {}, el("code", { text: job.training_file }));
    fileName(job.training_file).then((name) => { if (name) file.prepend(el("b", { text: name }), " "); });
    const ended = job.finished_at || (TERMINAL.includes(job.status) ? null : Date.now() / 1000);
    const r = job.result || {};
    const generative = r.task === "generate";
    const rows = [
      ["Backbone", job.model],
      ["Training file", file],
      ["Created", when(job.created_at)],
      ["Finished", when(job.finished_at)],
      ["Duration", ended ? duration(ended - job.created_at) + (job.finished_at ? "" : " so far") : ""],
      // The playground serves classifiers: a generative model is named, not linked.
      ["Fine-tuned model", !job.fine_tuned_model ? "" : generative ? el("code", { text: job.fine_tuned_model })
        : el("a", { href: `#/playground?model=${encodeURIComponent(job.fine_tuned_model)}`, text: job.fine_tuned_model })],
    ];
    if (generative) {
      rows.push(["Test exact match", r.test ? el("b", { text: percent(r.test_exact_match) }) : "none (no test rows)"]);
      if (r.test) rows.push(["Test loss", el("b", { text: decimal(r.test_loss) })]);
      rows.push(["Best validation loss", `${decimal(r.valid_loss)} (epoch ${r.best_epoch})`]);
    } else if (r.test !== undefined) {
      rows.push(["Test accuracy", r.test ? el("b", { text: percent(r.test_accuracy) }) : "none (no test rows)"]);
      if (r.test) rows.push(["Test macro-F1", el("b", { text: decimal(r.test_macro_f1) })]);
    }
    if (r.best_val_accuracy !== undefined) {
      rows.push(["Best validation accuracy", r.best_val_accuracy === null
        ? `none (no validation split: epoch ${r.best_epoch}, the last, kept)`
        : `${percent(r.best_val_accuracy)} (epoch ${r.best_epoch})`]);
    }
    if (r.train_examples_per_s !== undefined) rows.push(["Training speed", `${r.train_examples_per_s} examples/s`]);
    if (r.trainable_params !== undefined) rows.push(["Trainable parameters", `${r.trainable_params.toLocaleString()} (${Number(r.trainable_pct).toPrecision(2)}% of the backbone)`]);
    rows.push(["Hyperparameters", el("div", { class: "hp-list" }, Object.entries(job.hyperparameters)
      .map(([k, v]) => el("div", { "data-setting": k }, el("span", { class: "muted", text: `${k} ` }), showSetting(v))))]);
    $("#job-details").replaceChildren(...rows.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", {}, v)]));

    const warning = $("#job-warning");
    warning.hidden = !r.warning;
    if (r.warning) {
      warning.dataset.code = r.warning.code;
      warning.replaceChildren(el("b", { text: "No better than the majority class. " }), r.warning.message);
    }
    const failure = $("#job-failure");
    failure.hidden = !job.error;
    if (job.error) {
      failure.replaceChildren(el("b", { text: "The job failed: " }), el("code", { text: job.error.code }), " ",
        job.error.message);
    }
    // A job that ended before its first epoch has no curve: no empty chart card.
    showChartCard(!(streamed && TERMINAL.includes(job.status) && epochs.length === 0));
    if (counted) progress(counted, job.status);
    if (generative) generationEvaluation(r);
    else if (r.test !== undefined || r.validation) evaluation(r);
    if (r.attempts) attempts(r.attempts);
    if (r.candidates) candidates(r);
  }

  function showChartCard(visible) {
    $("#chart-card").hidden = !visible;
    $("#job-grid").classList.toggle("one", !visible);
  }

  function candidates(result) {
    $("#candidates-card").hidden = false;
    const axes = Object.keys(result.sweep || {});
    // Generative candidates are chosen by validation loss, classifiers by accuracy.
    const [best, figure] = result.task === "generate" ? ["best validation loss", (c) => decimal(c.best_valid_loss)]
      : ["best validation accuracy", (c) => percent(c.best_val_accuracy)];
    $("#candidates thead").replaceChildren(el("tr", {}, axes.map((a) => el("th", { text: SWEPT_NAMES[a] || a })),
      el("th", { text: best }), el("th", { text: "epochs" }), el("th", { text: "" })));
    $("#candidates tbody").replaceChildren(...result.candidates.map((c, k) => el("tr",
      { class: k === result.chosen ? "chosen" : "" },
      axes.map((a) => el("td", { text: show(c[a]) })),
      el("td", { text: figure(c) }),
      el("td", { text: c.history ? String(c.history.length) : "" }),
      el("td", { text: k === result.chosen ? "kept"
        : (c.halving || []).some((r) => !r.kept) ? `halved out after step ${c.steps}` : "" }))));
  }

  // The job as the server has it now.
  async function refresh() {
    const job = await api(url);
    if (!signal.aborted) details(job);
    return job;
  }

  function addEvent(event) {
    $("#events").append(el("li", { class: `level-${event.level}` },
      el("time", { text: new Date(event.created_at * 1000).toLocaleTimeString() }), " ", event.message));
    const data = event.data || {};
    if (data.step === "training" && typeof data.epoch === "number") {
      if ((data.attempt || 0) !== attempt) {
        attempt = data.attempt || 0;
        epochs = [];
        $("#chart-attempt").textContent = `(retry ${attempt})`;
      }
      epochs.push(data);
      showChartCard(true);
      if (chart) chart.destroy();
      chart = drawChart($("#chart"), epochs);
      if (data.samples) {
        $("#samples-card").hidden = false;
        $("#samples-card").dataset.epoch = String(data.epoch);
        $("#samples-epoch").textContent = `(epoch ${data.epoch}, validation prompts)`;
        $("#samples tbody").replaceChildren(...generationRows(data.samples));
      }
    }
    if (typeof data.done === "number" && typeof data.total === "number") {
      counted = event;
      progress(event, shown && shown.status);
    }
    if (data.status) $("#job-status").replaceChildren(statusBadge(data.status));
  }

  $("#cancel-job").addEventListener("click", async () => {
    try {
      details(await api(`/v1/fine_tuning/jobs/${jobId}/cancel`, { method: "POST" }));
    } catch (error) {
      showError("#job-page-error", error);
    }
  });

  let last = null; // the last event shown: a stream that breaks resumes after it
  try {
    await refresh();
    if (signal.aborted) return;
    for (;;) {
      try {
        await followEvents(jobId, (event) => { last = event.id; addEvent(event); }, signal, last);
        streamed = true;
        showError("#job-page-error", null);
      } catch (error) {
        if (signal.aborted || error instanceof ApiError) throw error;
        showError("#job-page-error", { message: "lost the connection to the server; retrying" });
        await new Promise((resolve) => setTimeout(resolve, 2000));
      }
      if (signal.aborted) return;
      const job = await refresh();
      if (signal.aborted || TERMINAL.includes(job.status)) return;
    }
  } catch (error) {
    if (!signal.aborted) showError("#job-page-error", error);
  }
}

async function modelsView() {
  mount("tpl-models", "models");
  const signal = leaving.signal;
  const models = await listForView("/v1/models", "#models-error", signal);
  if (!models) return;
  const sides = models.filter((m) => m.kind === "side");
  $("#models-empty").hidden = sides.length > 0;
  $("#side-models tbody").replaceChildren(...sides.map((m) => {
    const job = m.job_id ? el("a", { href: `#/jobs/${encodeURIComponent(m.job_id)}`, text: m.job_id }) : "";
    const name = el("td", {}, el("code", { text: m.id }));
    if (m.warning) {
      name.append(el("div", { class: "warning-note", "data-code": m.warning.code },
        el("b", { text: "No better than the majority class. " }), m.warning.message));
    }
    const task = m.task || "classify";
    // A generative model is scored by exact match, and the playground does not serve it.
    const figures = task === "generate"
      ? [el("td", { colspan: 2, class: "exact-match", text: testScore(m) })]
      : [el("td", { text: percent(m.test_accuracy) }),
        el("td", { class: "macro-f1", text: decimal(m.test_macro_f1) })];
    const row = el("tr", { "data-model": m.id, "data-task": task, class: m.warning ? "warned" : "" },
      name,
      el("td", {}, el("span", { class: `task task-${task}`, text: task })),
      el("td", { text: m.backbone }),
      el("td", {}, m.training_filename || (m.training_file ? el("code", { text: m.training_file }) : "")),
      el("td", {}, job),
      figures,
      el("td", { text: when(m.created) }),
      el("td", {},
        el("a", { href: `#/${task === "generate" ? "chat" : "playground"}?model=${encodeURIComponent(m.id)}`, text: "Try" }), " ",
        el("button", { type: "button", class: "danger", text: "Delete", onclick: async () => {
          if (!confirm(`Delete ${m.id}? Its files are removed; this cannot be undone.`)) return;
          try {
            await api(`/v1/models/${encodeURIComponent(m.id)}`, { method: "DELETE" });
            row.remove();
            $("#models-empty").hidden = $("#side-models tbody").children.length > 0;
          } catch (error) {
            showError("#models-error", error);
          }
        } })));
    return row;
  }));
  $("#backbones").replaceChildren(...models.filter((m) => m.kind === "backbone")
    .map((m) => el("li", {}, el("code", { text: m.id }))));
}

async function playgroundView(params) {
  mount("tpl-playground", "playground");
  const signal = leaving.signal;
  const wanted = params.getAll("model");
  const models = await listForView("/v1/models", "#predict-error", signal);
  if (!models) return;
  // /v1/predict serves classifiers: generative side models are left out, and said to be.
  const sides = models.filter((m) => m.kind === "side" && m.task !== "generate");
  $("#generative-note").hidden = !models.some((m) => m.kind === "side" && m.task === "generate");
  const pick = $("#pick-models");
  if (!sides.length) pick.append(el("p", { class: "muted" }, "No fine-tuned models yet. ", el("a", { href: "#/new", text: "Fine-tune one" }), "."));
  sides.forEach((m, k) => {
    const checked = wanted.length ? wanted.includes(m.id) : k === 0;
    pick.append(el("label", { class: "pick" },
      el("input", { type: "checkbox", value: m.id, checked }), ` ${m.id} `, el("span", { class: "muted", text: `(${m.backbone})` })));
  });

  $("#predict").addEventListener("click", async () => {
    showError("#predict-error", null);
    const ids = [...pick.querySelectorAll("input:checked")].map((i) => i.value);
    const texts = $("#texts").value.split("\n").map((t) => t.trim()).filter(Boolean);
    // A line "text<TAB>second text" is one input of a model trained on text pairs.
    const inputs = texts.map((t) => (t.includes("\t")
      ? { text: t.split("\t")[0].trim(), text_pair: t.split("\t").slice(1).join(" ").trim() } : t));
    const out = $("#predictions");
    if (!ids.length) return showError("#predict-error", { message: "pick at least one side model" });
    if (!texts.length) return showError("#predict-error", { message: "type at least one text" });
    $("#predict").disabled = true;
    try {
      // Side models of different backbones cannot share a backbone pass: one request each.
      const byBackbone = {};
      for (const id of ids) {
        const backbone = sides.find((m) => m.id === id).backbone;
        (byBackbone[backbone] = byBackbone[backbone] || []).push(id);
      }
      const results = {};
      await Promise.all(Object.values(byBackbone).map(async (group) => {
        const answer = await api("/v1/predict", { method: "POST", json: { model: group, inputs } });
        group.forEach((id, k) => { results[id] = answer.predictions[k]; });
      }));
      out.replaceChildren(...texts.map((text, i) => el("div", { class: "card prediction" },
        el("p", { class: "text", text }),
        el("div", { class: "side-by-side" }, ids.map((id) => scoreBars(id, results[id][i]))))));
    } catch (error) {
      showError("#predict-error", error);
    } finally {
      $("#predict").disabled = false;
    }
  });
}

function scoreBars(modelId, prediction) {
  const labels = Object.entries(prediction.scores).sort((a, b) => b[1] - a[1]);
  return el("div", { class: "scores", "data-model": modelId },
    el("p", {}, el("code", { text: modelId })),
    el("p", {}, "label: ", el("b", { class: "label", text: prediction.label })),
    labels.map(([label, score]) => el("div", { class: "bar-row" },
      el("span", { class: "bar-label", text: label }),
      el("span", { class: "bar" }, el("span", { class: label === prediction.label ? "fill top" : "fill",
        style: `width: ${(100 * score).toFixed(1)}%` })),
      el("span", { class: "bar-value", text: percent(score) }))));
}

// ---- chat: generative models through /v1/chat/completions, streamed -----------------------

// Posts a streamed chat completion and calls onDelta with each piece of text as it arrives;
// resolves with the finish reason.
async function streamChat(request, onDelta, signal) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: { ...authHeaders(), "Content-Type": "application/json" },
    body: JSON.stringify({ ...request, stream: true }),
    signal,
  });
  if (!response.ok) {
    let data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    const error = new ApiError(response.status, data);
    if (response.status === 401) askForKey(error.message);
    throw error;
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let finish = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, end).trim();
      buffer = buffer.slice(end + 2);
      if (!line.startsWith("data: ")) continue;
      const data = line.slice(6);
      if (data === "[DONE]") return finish;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(500, chunk);
      const choice = (chunk.choices || [])[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) onDelta(choice.delta.content);
      if (choice.finish_reason) finish = choice.finish_reason;
    }
  }
  return finish;
}

async function chatView(params) {
  mount("tpl-chat", "chat");
  const signal = leaving.signal;
  const models = await listForView("/v1/models", "#chat-error", signal);
  if (!models) return;
  const writers = models.filter((m) => m.kind === "backbone" || m.task === "generate");
  const wanted = params.getAll("model");
  const panes = [0, 1].map((k) => {
    const select = el("select", { "data-pane": k },
      k === 1 ? el("option", { value: "", text: "(none)" }) : null,
      writers.map((m) => el("option", { value: m.id, text: m.kind === "backbone" ? `${m.id} (backbone)` : m.id })));
    const first = writers.find((m) => m.kind === "side") || writers[0];
    select.value = wanted[k] || (k === 0 && first ? first.id : "");
    const log = el("div", { class: "chat-log", "data-pane": k });
    $("#chat-panes").append(el("div", { class: "card chat-pane" }, el("label", {}, "Model ", select), log));
    return { select, log, messages: [] };
  });

  $("#chat-clear").addEventListener("click", () => {
    for (const pane of panes) { pane.messages = []; pane.log.replaceChildren(); }
  });

  $("#chat-send").addEventListener("click", async () => {
    showError("#chat-error", null);
    const text = $("#chat-input").value.trim();
    if (!text) return showError("#chat-error", { message: "type a message" });
    const active = panes.filter((p) => p.select.value);
    if (!active.length) return showError("#chat-error", { message: "pick a model" });
    const seed = $("#chat-seed").value;
    const settings = {
      temperature: Number($("#chat-temperature").value),
      top_p: Number($("#chat-top-p").value),
      max_tokens: Number($("#chat-max-tokens").value),
      ...(seed === "" ? {} : { seed: Number(seed) }),
    };
    $("#chat-send").disabled = true;
    try {
      await Promise.all(active.map(async (pane) => {
        pane.messages.push({ role: "user", content: text });
        pane.log.append(el("p", { class: "chat-user", text }));
        const reply = el("p", { class: "chat-assistant", "aria-live": "polite" });
        const reason = el("span", { class: "muted finish" });
        pane.log.append(reply, reason);
        const finish = await streamChat(
          { model: pane.select.value, messages: pane.messages, ...settings },
          (delta) => { reply.textContent += delta; }, signal);
        pane.messages.push({ role: "assistant", content: reply.textContent });
        reason.textContent = finish === "length" ? " (stopped at max tokens)" : "";
      }));
    } catch (error) {
      if (!signal.aborted) showError("#chat-error", error);
    } finally {
      $("#chat-send").disabled = false;
    }
  });
}

// ---- routing ----------------------------------------------------------------------------

function route() {
  const [path, query] = (location.hash.slice(1) || "/").split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean);
  if (parts[0] === "new") return newJobView();
  if (parts[0] === "jobs" && parts[1]) return jobView(decodeURIComponent(parts[1]));
  if (parts[0] === "models") return modelsView();
  if (parts[0] === "playground") return playgroundView(params);
  if (parts[0] === "chat") return chatView(params);
  return jobsView();
}

// A view shows its own errors; anything else would be a bug of the page: logged.
const showRoute = () => route().catch((error) => console.error(error));
window.addEventListener("hashchange", showRoute);
setupKey();
showServer();
showRoute();
