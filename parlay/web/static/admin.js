"use strict";
// The admin page: reads /api/admin/summary with the admin token from the link's fragment
// (#token=…, and optionally &refresh=SECONDS) and draws it: per-condition points with their
// 95 % intervals and the dropout as inline SVG built with DOM calls (the page's content security
// policy allows no inline script or style, and nothing outside this server is loaded), the games
// in progress, and the tables; it refreshes itself.
const token = (location.hash.match(/token=([A-Za-z0-9_-]+)/) || [])[1] || "";
const every = Math.max(1, Number((location.hash.match(/refresh=(\d+)/) || [])[1]) || 5);
const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";

class HttpError extends Error {
  constructor(status, detail) { super(detail); this.status = status; }
}

async function call(path, method = "GET") {
  const init = { method, headers: { Authorization: `Bearer ${token}` } };
  if (method === "POST") { init.body = "{}"; init.headers["Content-Type"] = "application/json"; }
  const response = await fetch(path, init);
  if (!response.ok) {
    let detail = `error ${response.status}`;
    try { detail = (await response.json()).detail || detail; } catch (e) { /* not JSON */ }
    throw new HttpError(response.status, detail);
  }
  return response;
}

function cellOf(value, tag) {
  const cell = document.createElement(tag);
  if (value instanceof Node) cell.append(value);
  else cell.textContent = value === null || value === undefined ? "" : String(value);
  return cell;
}

function table(id, header, rows) {
  const make = (cells, tag) => {
    const tr = document.createElement("tr");
    tr.append(...cells.map((c) => cellOf(c, tag)));
    return tr;
  };
  $(id).replaceChildren(make(header, "th"), ...rows.map((r) => make(r, "td")));
}

const fmt = (x, digits = 2) => (x === null || x === undefined ? "" : Number(x).toFixed(digits));
const pct = (x) => (x === null || x === undefined ? "" : `${(100 * x).toFixed(0)} %`);
function withCi(metrics, ci, name, f) {
  const interval = ci[name];
  return interval ? `${f(metrics[name])} [${f(interval[0])}, ${f(interval[1])}]` : f(metrics[name]);
}
function duration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, "0")} s`;
  return `${Math.floor(s / 3600)} h ${String(Math.floor(s / 60) % 60).padStart(2, "0")} min`;
}

// -- drawing

function el(name, attributes = {}, text = null) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, String(value));
  if (text !== null) node.textContent = text;
  return node;
}

function niceTicks(low, high, count = 5) {
  if (!(high > low)) { low -= 1; high += 1; }
  const raw = (high - low) / (count - 1);
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * power).find((s) => s >= raw);
  const first = Math.floor(low / step + 1e-9) * step;
  const last = Math.ceil(high / step - 1e-9) * step;
  const ticks = [];
  for (let t = first; t <= last + step / 2; t += step) ticks.push(Number(t.toFixed(10)));
  return ticks;
}

const LABEL_W = 170, PLOT_W = 300, VALUE_W = 200, ROW_H = 30, TOP = 8, AXIS_H = 30;
const short = (name) => (name.length > 24 ? `${name.slice(0, 23)}…` : name);

// One row per condition: its name, a line from the interval's low to its high end, a point at
// the mean, and the figures in words (also the point's tooltip). A condition without finished
// games gets its name and "no finished games", no point.
function forest(id, conditions, metric, f, fixed) {
  const rows = conditions.map((c) => ({
    name: c.name,
    value: c.metrics[metric],
    ci: c.ci95[metric] || null,
    games: c.metrics.games,
  }));
  const known = rows.filter((r) => r.games > 0 && r.value !== null && r.value !== undefined);
  const ends = known.flatMap((r) => (r.ci ? [r.value, ...r.ci] : [r.value]));
  const ticks = fixed || niceTicks(Math.min(0, ...ends), Math.max(0, ...ends, 1));
  const low = ticks[0], high = ticks[ticks.length - 1];
  const x = (v) => LABEL_W + ((v - low) / (high - low)) * PLOT_W;
  const height = TOP + rows.length * ROW_H + AXIS_H;
  const svg = el("svg", {
    viewBox: `0 0 ${LABEL_W + PLOT_W + VALUE_W} ${height}`, class: "chart", role: "img", "data-metric": metric,
  });
  svg.append(el("title", {}, `${metric} per condition, with 95 % intervals`));
  const axisY = TOP + rows.length * ROW_H;
  for (const t of ticks) {
    svg.append(el("line", { x1: x(t), x2: x(t), y1: TOP, y2: axisY, class: t === 0 ? "grid zero" : "grid" }));
    svg.append(el("text", { x: x(t), y: axisY + 18, class: "tick" }, f(t)));
  }
  svg.append(el("line", { x1: LABEL_W, x2: LABEL_W + PLOT_W, y1: axisY, y2: axisY, class: "axis" }));
  rows.forEach((r, i) => {
    const y = TOP + i * ROW_H + ROW_H / 2;
    const label = el("text", { x: LABEL_W - 8, y: y + 5, class: "label" }, short(r.name));
    label.append(el("title", {}, r.name));
    svg.append(label);
    if (!known.includes(r)) {
      svg.append(el("text", { x: LABEL_W + 6, y: y + 5, class: "value none" }, "no finished games"));
      return;
    }
    const words = r.ci ? `${f(r.value)} [${f(r.ci[0])}, ${f(r.ci[1])}]` : f(r.value);
    if (r.ci) {
      svg.append(el("line", {
        x1: x(r.ci[0]), x2: x(r.ci[1]), y1: y, y2: y, class: "interval",
        "data-condition": r.name, "data-low": r.ci[0], "data-high": r.ci[1],
      }));
      for (const end of r.ci) svg.append(el("line", { x1: x(end), x2: x(end), y1: y - 6, y2: y + 6, class: "interval-end" }));
    }
    const point = el("circle", { cx: x(r.value), cy: y, r: 6, class: "point", "data-condition": r.name, "data-value": r.value });
    point.append(el("title", {}, `${r.name}: ${words} (${r.games} games)`));
    svg.append(point);
    svg.append(el("text", { x: LABEL_W + PLOT_W + 10, y: y + 5, class: "value", "data-condition": r.name }, `${words}  n=${r.games}`));
  });
  $(id).replaceChildren(svg);
}

const KINDS = [["finished", "finished"], ["abandoned", "abandoned"], ["live", "live"]];

// One stacked bar per condition: finished, abandoned and live games, on one scale.
function dropoutBars(id, conditions) {
  const most = Math.max(1, ...conditions.map((c) => c.started));
  const height = TOP + conditions.length * ROW_H + 26;
  const svg = el("svg", { viewBox: `0 0 ${LABEL_W + PLOT_W + 2 * VALUE_W} ${height}`, class: "chart wide", role: "img" });
  svg.append(el("title", {}, "Games per condition: finished, abandoned, live"));
  conditions.forEach((c, i) => {
    const y = TOP + i * ROW_H;
    const label = el("text", { x: LABEL_W - 8, y: y + ROW_H / 2 + 5, class: "label" }, short(c.name));
    label.append(el("title", {}, c.name));
    svg.append(label);
    let left = LABEL_W;
    for (const [kind] of KINDS) {
      const width = (c[kind] / most) * PLOT_W;
      if (c[kind] > 0) {
        const bar = el("rect", {
          x: left, y: y + 5, width, height: ROW_H - 10, class: `bar ${kind}`, "data-condition": c.name, "data-count": c[kind],
        });
        bar.append(el("title", {}, `${c.name}: ${c[kind]} ${kind}`));
        svg.append(bar);
      }
      left += width;
    }
    const words = `${c.started} started: ${c.finished} finished, ${c.abandoned} abandoned, ${c.live} live`;
    svg.append(el("text", { x: LABEL_W + PLOT_W + 10, y: y + ROW_H / 2 + 5, class: "value small" }, words));
  });
  const legendY = TOP + conditions.length * ROW_H + 14;
  KINDS.forEach(([kind, words], k) => {
    svg.append(el("rect", { x: LABEL_W + k * 100, y: legendY - 9, width: 12, height: 12, class: `bar ${kind}` }));
    svg.append(el("text", { x: LABEL_W + k * 100 + 17, y: legendY + 2, class: "legend" }, words));
  });
  $(id).replaceChildren(svg);
}

// -- the games in progress

function endButton(game) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "secondary small";
  button.textContent = "End";
  button.setAttribute("aria-label", `End game ${game.game} as abandoned`);
  button.addEventListener("click", async () => {
    if (!confirm(`End game ${game.game} (participant ${game.participant}) as abandoned?`)) return;
    try {
      await call(`/api/admin/games/${encodeURIComponent(game.game)}/end`, "POST");
    } catch (e) {
      $("status").textContent = e.message;
    }
    load();
  });
  return button;
}

function inProgress(data) {
  const live = data.in_progress;
  const timeout = data.abandon_after_minutes;
  $("live-note").textContent = `${live.length} game${live.length === 1 ? "" : "s"} being played. ` + (timeout
    ? `A game waiting for its person ends as abandoned after ${timeout} minutes.`
    : "This study never ends a game for waiting.");
  table("live", ["game", "participant", "game no.", "condition", "turns so far", "messages", "whose turn",
    "since last move", "abandoned in", ""],
  live.map((g) => [g.game, g.participant, g.game_number, g.condition, g.turns, g.messages,
    g.to_move === "person" ? (g.proposal_owed ? "person (proposal owed)" : "person") : "model",
    duration(g.since_last_move_s), duration(g.abandons_in_s), endButton(g)]));
}

// -- loading

let loading = false;
let timer = null;

async function load() {
  if (loading) return;
  loading = true;
  try {
    const data = await (await call("/api/admin/summary")).json();
    $("study").textContent = data.study;
    $("metrics-use").textContent = `Seat A is the person, seat B the model. Points: means over ${data.metrics_use}; `
      + "lines: bootstrap 95 % intervals over games.";
    forest("chart-reward", data.conditions, "mean_reward_a", (v) => fmt(v));
    forest("chart-model-reward", data.conditions, "mean_reward_b", (v) => fmt(v));
    forest("chart-agreement", data.conditions, "agreement_rate", pct, [0, 0.25, 0.5, 0.75, 1]);
    dropoutBars("chart-dropout", data.conditions);
    table("dropout", ["condition", "started", "finished", "abandoned", "live"],
      data.conditions.map((c) => [c.name, c.started, c.finished, c.abandoned, c.live]));
    inProgress(data);
    table("conditions", ["condition", "agent", "objective", "games", "person's reward", "model's reward", "agreement", "Pareto", "errors"],
      data.conditions.map((c) => [c.name, c.agent, c.objective, c.metrics.games,
        withCi(c.metrics, c.ci95, "mean_reward_a", fmt), withCi(c.metrics, c.ci95, "mean_reward_b", fmt),
        withCi(c.metrics, c.ci95, "agreement_rate", pct), withCi(c.metrics, c.ci95, "pareto_rate", pct),
        withCi(c.metrics, c.ci95, "error_rate", pct)]));
    table("workers", ["agent", "batches", "turns", "mean batch", "seconds in the model", "queued"],
      Object.entries(data.workers).map(([spec, w]) => [spec, w.batches, w.turns, fmt(w.mean_batch, 1), fmt(w.act_seconds, 1), w.queued]));
    table("participants", ["#", "stage", "conditions", "games done", "games abandoned", "points", `bonus (${data.currency})`, "check attempts"],
      data.participants.map((p) => [p.number, p.stage, p.conditions.join(", "), p.games_done, p.games_abandoned, fmt(p.points, 1), fmt(p.bonus), p.check_attempts]));
    table("games", ["game", "participant", "condition", "status", "outcome", "person", "model", "turns", "updated"],
      data.games.map((g) => [g.game, g.participant, g.condition, g.status, g.outcome, g.human_reward, g.model_reward, g.turns, g.updated]));
    $("status").className = "";
    $("status").textContent = `Updated ${new Date().toLocaleTimeString()}; refreshes every ${every} s.`;
  } catch (e) {
    $("status").className = "lost";
    if (e instanceof HttpError && (e.status === 401 || e.status === 403)) {
      clearInterval(timer);  // a wrong token stays wrong: no more tries
      $("status").textContent = e.message;
    } else {
      $("status").textContent = `${e.message} (showing the last figures; trying again every ${every} s)`;
    }
  } finally {
    loading = false;
  }
}

async function download(path, name) {
  try {
    const blob = await (await call(path)).blob();
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = name;
    link.click();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  } catch (e) {
    $("status").textContent = e.message;
  }
}

$("refresh").addEventListener("click", load);
$("export-jsonl").addEventListener("click", () => download("/api/admin/export.jsonl", "episodes.jsonl"));
$("export-csv").addEventListener("click", () => download("/api/admin/export.csv", "games.csv"));
if (!token) {
  $("status").textContent = "Open this page with the admin link printed by parlay serve.";
} else {
  timer = setInterval(load, every * 1000);
  load();
}
