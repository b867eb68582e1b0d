"use strict";
// The admin page: reads /api/admin/* with the admin token from the link's fragment.
const token = (location.hash.match(/token=([A-Za-z0-9_-]+)/) || [])[1] || "";
const $ = (id) => document.getElementById(id);

async function get(path) {
  const response = await fetch(path, { headers: { Authorization: `Bearer ${token}` } });
  if (!response.ok) {
    let detail = `error ${response.status}`;
    try { detail = (await response.json()).detail || detail; } catch (e) { /* not JSON */ }
    throw new Error(detail);
  }
  return response;
}

function table(id, header, rows) {
  const node = $(id);
  const make = (cells, tag) => {
    const tr = document.createElement("tr");
    for (const c of cells) {
      const cell = document.createElement(tag);
      cell.textContent = c === null || c === undefined ? "" : String(c);
      tr.append(cell);
    }
    return tr;
  };
  node.replaceChildren(make(header, "th"), ...rows.map((r) => make(r, "td")));
}

const fmt = (x, digits = 2) => (x === null || x === undefined ? "" : Number(x).toFixed(digits));
const pct = (x) => (x === null || x === undefined ? "" : `${(100 * x).toFixed(0)} %`);
function withCi(metrics, ci, name, f) {
  const interval = ci[name];
  return interval ? `${f(metrics[name])} [${f(interval[0])}, ${f(interval[1])}]` : f(metrics[name]);
}

async function load() {
  try {
    const data = await (await get("/api/admin/summary")).json();
    $("study").textContent = data.study;
    table("conditions", ["condition", "agent", "objective", "games", "person's reward", "model's reward", "agreement", "Pareto", "errors"],
      data.conditions.map((c) => [c.name, c.agent, c.objective, c.metrics.games,
        withCi(c.metrics, c.ci95, "mean_reward_a", fmt), withCi(c.metrics, c.ci95, "mean_reward_b", fmt),
        withCi(c.metrics, c.ci95, "agreement_rate", pct), withCi(c.metrics, c.ci95, "pareto_rate", pct),
        withCi(c.metrics, c.ci95, "error_rate", pct)]));
    table("workers", ["agent", "batches", "turns", "mean batch", "seconds in the model", "queued"],
      Object.entries(data.workers).map(([spec, w]) => [spec, w.batches, w.turns, fmt(w.mean_batch, 1), fmt(w.act_seconds, 1), w.queued]));
    table("participants", ["#", "stage", "conditions", "games done", "points", `bonus (${data.currency})`, "check attempts"],
      data.participants.map((p) => [p.number, p.stage, p.conditions.join(", "), p.games_done, fmt(p.points, 1), fmt(p.bonus), p.check_attempts]));
    table("games", ["game", "participant", "condition", "status", "outcome", "person", "model", "turns", "updated"],
      data.games.map((g) => [g.game, g.participant, g.condition, g.status, g.outcome, g.human_reward, g.model_reward, g.turns, g.updated]));
    $("status").textContent = `Updated ${new Date().toLocaleTimeString()}.`;
  } catch (e) {
    $("status").textContent = e.message;
  }
}

async function download(path, name) {
  try {
    const blob = await (await get(path)).blob();
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
if (!token) $("status").textContent = "Open this page with the admin link printed by parlay serve.";
else load();
