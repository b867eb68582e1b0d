"use strict";
// The participant's page: consent → instructions and check → games → completion code.
// Everything shown from the server is set as text (textContent), never as HTML.

const ITEMS = ["book", "hat", "ball"];
const token = (location.hash.match(/token=([A-Za-z0-9_-]+)/) || [])[1] || "";
const $ = (id) => document.getElementById(id);
let current = null;     // the game on screen
let pending = null;     // a move being sent: {body}, resent with the same move_id after a network error

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}
function fmt(x) { return Number.isInteger(x) ? String(x) : x.toFixed(1); }
function plural(n, item) { return `${n} ${item}${n === 1 ? "" : "s"}`; }
function describe(kept) { return kept.map((n, i) => plural(n, ITEMS[i])).join(", "); }
function newMoveId() {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}
function setStatus(text) { $("status").textContent = text || ""; }
function show(section) {
  for (const id of ["consent", "declined", "check", "game", "done"]) $(id).hidden = id !== section;
}

class ApiError extends Error {
  constructor(status, detail) { super(detail); this.status = status; }
}
async function api(method, path, body) {
  const init = { method, headers: { Authorization: `Bearer ${token}` } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  let data = {};
  try { data = await response.json(); } catch (e) { data = {}; }
  if (!response.ok) throw new ApiError(response.status, data.detail || `error ${response.status}`);
  return data;
}

async function refresh() {
  if (!token) { setStatus("This page needs the personal link you were given."); return; }
  let me;
  try { me = await api("GET", "/api/me"); } catch (e) { setStatus(e.message); return; }
  setStatus("");
  if (me.stage === "consent") {
    $("consent-text").textContent = me.consent;
    show("consent");
    $("agree").focus();
  } else if (me.stage === "check") {
    show("check");
    renderCheck(me);
  } else if (me.stage === "play") {
    await startGame();
  } else if (me.stage === "ended") {
    show("done");
    $("done-text").textContent = "Your part in this study has been ended by the researchers. Thank you for your time.";
  } else {
    show("done");
    const abandoned = me.games_over - me.games_done;
    $("done-text").textContent =
      `You finished all ${me.games_total} games and earned ${fmt(me.points)} points` +
      (me.bonus > 0 ? `: a bonus of ${me.bonus.toFixed(2)} ${me.currency}.` : ".");
    $("points-explained").textContent =
      "Your points are your \"Score under this game's rule\" from each game's result, added up: " +
      me.points_per_game.map((p, i) => `game ${i + 1}: ${fmt(p)}`).join(", ") + ` (total ${fmt(me.points)}).` +
      (abandoned > 0 ? ` ${abandoned} game(s) ended because no move came in time and count 0.` : "") +
      (me.bonus_per_point > 0 ? ` Each point is worth ${me.bonus_per_point} ${me.currency}.` : "");
    if (me.completion_code) {
      $("completion-code").textContent = me.completion_code;
      $("code-line").hidden = false;
    }
  }
}

$("decline").addEventListener("click", () => { show("declined"); });
$("copy-code").addEventListener("click", async () => {
  const code = $("completion-code").textContent;
  try {
    await navigator.clipboard.writeText(code);
    $("copy-result").textContent = "Copied.";
  } catch (e) {  // no clipboard permission: select the code so the person can copy it
    const range = document.createRange();
    range.selectNodeContents($("completion-code"));
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    $("copy-result").textContent = "Selected: press Ctrl+C (or ⌘C) to copy.";
  }
});

$("agree").addEventListener("click", async () => {
  try { await api("POST", "/api/consent", { agree: true }); await refresh(); } catch (e) { setStatus(e.message); }
});

function renderCheck(me) {
  const list = $("instructions");
  list.replaceChildren(...me.instructions.map((line) => el("li", line)));
  const box = $("questions");
  box.replaceChildren();
  for (const q of me.questions) {
    const fs = el("fieldset", null, "question");
    fs.id = `q-${q.id}`;
    fs.append(el("legend", q.text));
    q.options.forEach((option, i) => {
      const label = el("label");
      const input = document.createElement("input");
      input.type = "radio";
      input.name = q.id;
      input.value = String(i);
      label.append(input, " ", option);
      fs.append(label);
    });
    box.append(fs);
  }
  const first = box.querySelector("input");
  if (first) first.focus();
}

$("check-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const answers = {};
  for (const fs of $("questions").querySelectorAll("fieldset")) {
    const chosen = fs.querySelector("input:checked");
    if (chosen) answers[chosen.name] = Number(chosen.value);
  }
  try {
    const result = await api("POST", "/api/check", { answers });
    if (result.passed) { await refresh(); return; }
    for (const fs of $("questions").querySelectorAll("fieldset")) {
      const wrong = result.wrong.includes(fs.id.slice(2));
      fs.classList.toggle("wrong", wrong);
      fs.setAttribute("aria-invalid", wrong ? "true" : "false");
      const old = fs.querySelector(".wrong-mark");
      if (old) old.remove();
      if (wrong) fs.querySelector("legend").append(el("span", "Not right yet", "wrong-mark"));
    }
    $("check-result").textContent =
      `${result.wrong.length} answer(s) are not right yet (marked "Not right yet"). Read the rules above and try again.`;
  } catch (e) { $("check-result").textContent = e.message; }
});

async function startGame() {
  let data;
  try { data = await api("POST", "/api/games/next"); } catch (e) { setStatus(e.message); return; }
  if (data.done) { await refresh(); return; }
  current = null;
  $("message").value = "";          // nothing typed in one game carries into the next
  $("feedback").textContent = "";
  show("game");
  render(data.game);
  poll(data.game.id);
}

let lost = false;  // the connection to the server was lost while waiting
function setLost(text) {
  lost = Boolean(text);
  $("status").classList.toggle("lost", lost);
  setStatus(text);
}

async function poll(id) {
  while (current && current.id === id && !current.finished) {
    try {
      const game = await api("GET", `/api/games/${encodeURIComponent(id)}?after=${current.version}`);
      if (current && current.id === id) render(game);
      if (lost) {
        setLost("");
        setStatus("Connection restored: the game is up to date.");
      }
    } catch (e) {
      setLost(`Connection to the study server lost (${e.message}). Reconnecting… you do not need to reload.`);
      await new Promise((resolve) => setTimeout(resolve, 2000));
    }
  }
}

function render(game) {
  const fresh = !current || current.id !== game.id;
  if (!fresh && game.version < current.version) return;  // an older answer arriving late
  current = game;
  $("game-number").textContent = game.number;
  $("game-total").textContent = game.of;
  $("objective").textContent = game.objective;
  if (fresh) renderItems(game);
  $("messages-left").textContent =
    `${game.max_messages - game.messages} of ${game.max_messages} messages left in this game.`;
  $("chat").replaceChildren(...game.chat.map(chatLine));
  $("typing").hidden = !game.partner_typing;
  const input = $("message");
  input.maxLength = game.max_message_chars;
  const myTurn = game.your_turn && !pending;
  input.disabled = $("send").disabled = !myTurn || game.proposal_owed;
  $("propose").disabled = !myTurn || !game.may_propose;
  for (const field of $("proposal-inputs").querySelectorAll("input")) field.disabled = !myTurn || !game.may_propose;
  $("proposal-hint").textContent = game.finished ? "" :
    game.proposal_owed ? "Your partner made a secret proposal: now make yours. The game then ends." :
    !game.may_propose ? "Send at least one message before proposing." :
    "Proposals are secret until the end; once one is made, the other player must propose too.";
  $("controls").hidden = game.finished;
  if (game.finished) renderResult(game);
  else {
    $("result").hidden = true;
    if (myTurn && (fresh || document.activeElement === document.body)) {
      (game.proposal_owed ? $("proposal-inputs").querySelector("input") : input).focus();
    }
  }
}

function renderItems(game) {
  const boxes = ITEMS.map((item, i) => {
    const box = el("div", null, "item");
    const img = document.createElement("img");
    img.src = `/static/${item}.svg`;
    img.alt = "";
    box.append(img, el("div", `× ${game.counts[i]}`, "count"), el("div", `${item}s`),
      el("div", `${game.values[i]} point${game.values[i] === 1 ? "" : "s"} each to you`, "value"));
    return box;
  });
  $("items").replaceChildren(...boxes);
  const fields = ITEMS.map((item, i) => {
    const wrap = el("label", `${item}s (0–${game.counts[i]})`, "proposal-field");
    const input = document.createElement("input");
    input.type = "number";
    input.min = "0";
    input.max = String(game.counts[i]);
    input.value = "0";
    input.required = true;
    input.inputMode = "numeric";
    input.name = item;
    wrap.append(input);
    return wrap;
  });
  $("proposal-inputs").replaceChildren(...fields);
  $("feedback").textContent = "";
}

function chatLine(entry) {
  const li = el("li", null, entry.from);
  li.append(el("span", entry.from === "you" ? "You" : "Partner", "who"));
  if (entry.kind === "message") li.append(document.createTextNode(entry.text));
  else if (entry.from === "you") {
    li.classList.add("note");
    li.append(document.createTextNode(`You proposed to keep ${describe(entry.kept)}.`));
  } else {
    li.classList.add("note");
    li.append(document.createTextNode("Your partner made a secret proposal."));
  }
  return li;
}

function renderResult(game) {
  const r = game.result;
  const text = {
    deal: "Deal! Your proposals divide the items exactly.",
    invalid_deal: "No deal: the two proposals did not divide the items, so both of you score 0.",
    no_deal: "No deal: the game ended without proposals, so both of you score 0.",
    aborted: "The game was stopped because your partner kept sending invalid replies; both score 0.",
    failed: "The game could not go on because of a technical problem; both score 0.",
    abandoned: "The game ended because no move came in time; both score 0.",
  }[r.status] || r.status;
  $("result-text").textContent = text;
  const rows = [["", "You", "Partner"]];
  if (r.your_proposal) rows.push(["Kept", describe(r.your_proposal), r.partner_proposal ? describe(r.partner_proposal) : "—"]);
  rows.push(["Points", r.your_score, r.partner_score], ["Score under this game's rule", r.your_reward, r.partner_reward]);
  $("result-table").replaceChildren(...rows.map((cells, i) => {
    const tr = el("tr");
    tr.append(...cells.map((c) => el(i === 0 ? "th" : "td", c)));
    return tr;
  }));
  $("next-game").textContent = game.number < game.of ? "Next game" : "Finish";
  $("result").hidden = false;
  $("next-game").focus();
}

async function sendMove(body) {
  pending = body;
  render(current);
  $("feedback").textContent = "";
  for (let attempt = 0; attempt < 5; attempt += 1) {
    try {
      const data = await api("POST", `/api/games/${encodeURIComponent(current.id)}/moves`, body);
      pending = null;
      $("feedback").textContent = "";  // an earlier error no longer applies
      render(data.game);
      return true;
    } catch (e) {
      if (e instanceof ApiError && e.status !== 429 && e.status < 500) {
        pending = null;
        $("feedback").textContent = e.message;
        render(current);
        return false;
      }
      await new Promise((resolve) => setTimeout(resolve, 1000 * (attempt + 1)));  // same move_id: applied once
    }
  }
  pending = null;
  $("feedback").textContent = "Your move could not be sent. Check your connection and try again.";
  render(current);
  return false;
}

$("message").addEventListener("input", () => { $("feedback").textContent = ""; });

$("message-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = $("message").value.trim();
  if (!text) { $("feedback").textContent = "Write a message first."; return; }
  if (await sendMove({ move_id: newMoveId(), kind: "message", text })) {
    $("message").value = "";
  }
  if (!$("message").disabled) $("message").focus();
});

$("proposal-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const inputs = Array.from($("proposal-inputs").querySelectorAll("input"));
  const kept = inputs.map((input) => Number(input.value));
  const bad = kept.findIndex((n, i) => !Number.isInteger(n) || n < 0 || n > current.counts[i]);
  if (bad >= 0) {
    $("feedback").textContent = `Keep between 0 and ${current.counts[bad]} ${ITEMS[bad]}s.`;
    inputs[bad].focus();
    return;
  }
  await sendMove({ move_id: newMoveId(), kind: "proposal", kept });
});

$("next-game").addEventListener("click", async () => {
  current = null;
  await refresh();
});

refresh();
