"""Load on the study server: many simulated participants at once over HTTP on loopback.

    python bench/serve.py                       # 50 participants against a bot, 16 against the embedded model
    python bench/serve.py --model-participants 0  # the bot part only

It starts ``parlay serve`` as its own process on a fresh SQLite database, makes the participants'
tokens, and runs every participant as an asyncio task of one client process: consent, the
comprehension check, then its games (a few messages, then a random valid proposal), waiting for
the partner's replies by long polling, as the page does.

Measured:
- **server latency**: every request that does not wait for the partner (pages of the study's
  steps, moves, game creation), client-side round trip on loopback: the server's own time,
  model time excluded (a move is acknowledged before the model answers it);
- **time to the partner's reply**: from a move's acknowledgement to the view that shows the
  partner's answer (or the game's end);
- **errors**: any answer that is not 2xx; **lost or corrupted games**: after the run every
  participant must have all games finished in the database, each game's stored moves must
  replay to its stored episode, every episode must pass ``check_episode``, and the person's
  turns in it must be exactly the moves the client had acknowledged;
- the model worker's **mean batch** (turns per ``Agent.act`` call), from the admin summary.

Figures are appended to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from parlay.episode import Episode  # noqa: E402
from parlay.games import objective  # noqa: E402
from parlay.protocol import message_reply, proposal_reply  # noqa: E402
from parlay.testing import check_episode  # noqa: E402
from parlay.web.hub import replay  # noqa: E402
from parlay.web.store import Store  # noqa: E402
from parlay.web.study import comprehension_questions, study_from_flags  # noqa: E402
from tests.web_support import free_port, start_process  # noqa: E402

RESULTS = Path(__file__).with_name("RESULTS.md")
ADMIN = "bench-admin-token-0123456789abcdef"
OBJECTIVE = "semi-competitive"


class Participant:
    def __init__(self, client: httpx.AsyncClient, token: str, seed: int, think: float) -> None:
        self.client, self.headers, self.think = client, {"Authorization": f"Bearer {token}"}, think
        self.rng = np.random.default_rng(seed)
        self.latencies: list[float] = []
        self.replies: list[float] = []
        self.errors: list[str] = []
        self.sent: dict[str, list[str]] = {}
        """Game id → the texts of the person's acknowledged moves."""

    async def call(self, method: str, path: str, timed: bool = True, **kwargs) -> dict:
        started = time.perf_counter()
        response = await self.client.request(method, path, headers=self.headers, **kwargs)
        if timed:
            self.latencies.append(time.perf_counter() - started)
        if response.status_code >= 300:
            self.errors.append(f"{method} {path}: {response.status_code} {response.text[:200]}")
            raise RuntimeError(self.errors[-1])
        return response.json()

    async def run(self) -> None:
        me = await self.call("GET", "/api/me")
        await self.call("POST", "/api/consent", json={"agree": True})
        answers = {q["id"]: q["answer"] for q in comprehension_questions(objective(OBJECTIVE))}
        await self.call("POST", "/api/check", json={"answers": answers})
        for _ in range(me["games_total"]):
            await self.play((await self.call("POST", "/api/games/next"))["game"])

    async def play(self, game: dict) -> None:
        moves, messages = 0, int(self.rng.integers(1, 4))
        self.sent[game["id"]] = []
        while not game["finished"]:
            if not game["your_turn"]:
                game = await self.call("GET", f"/api/games/{game['id']}?after={game['version']}", timed=False)
                continue
            if self.think:  # a person reads and types before moving
                await asyncio.sleep(float(self.rng.exponential(self.think)))
            if game["may_propose"] and (game["proposal_owed"] or moves >= messages):
                kept = [int(self.rng.integers(0, c + 1)) for c in game["counts"]]
                body = {"move_id": f"{game['id']}-{moves}", "kind": "proposal", "kept": kept}
                text = proposal_reply(tuple(kept))
            else:
                words = " ".join(self.rng.choice(["books", "hats", "balls", "deal", "please", "fair"], 5))
                body = {"move_id": f"{game['id']}-{moves}", "kind": "message", "text": f"How about {words}?"}
                text = message_reply(f"How about {words}?")
            game = (await self.call("POST", f"/api/games/{game['id']}/moves", json=body))["game"]
            self.sent[game["id"]].append(text)
            moves += 1
            acked, seen = time.perf_counter(), len(game["chat"])
            while not game["finished"] and not game["your_turn"]:
                game = await self.call("GET", f"/api/games/{game['id']}?after={game['version']}", timed=False)
            if any(line["from"] == "partner" for line in game["chat"][seen:]):  # not when it never answered
                self.replies.append(time.perf_counter() - acked)


def verify(store: Store, study_name: str, participants: list[Participant], games_each: int) -> list[str]:
    """Every way a game could have been lost or corrupted, as a list of problems (empty: none)."""
    problems = []
    rows = store.games(study_name)
    if len(rows) != len(participants) * games_each:
        problems.append(f"{len(rows)} games stored for {len(participants)} × {games_each}")
    sent = {gid: texts for p in participants for gid, texts in p.sent.items()}
    for row in rows:
        if row.status != "done" or row.episode is None:
            problems.append(f"{row.id}: not finished")
            continue
        episode = Episode.model_validate(row.episode)
        check_episode(episode, objective(OBJECTIVE))
        game = replay(row, store.moves(row.id))
        if [t.model_dump() for t in game.turns] != [t.model_dump() for t in episode.turns]:
            problems.append(f"{row.id}: the stored moves do not replay to the stored episode")
        human = [t.text for t in episode.turns if t.player == "A"]
        if human != sent.get(row.id):
            problems.append(f"{row.id}: the person's turns differ from the acknowledged moves")
    return problems


async def drive(base: str, tokens: list[str], seed: int, think: float) -> tuple[list[Participant], float]:
    limits = httpx.Limits(max_connections=4 * len(tokens), max_keepalive_connections=4 * len(tokens))
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        people = [Participant(client, t, seed + i, think) for i, t in enumerate(tokens)]
        started = time.perf_counter()
        outcomes = await asyncio.gather(*(p.run() for p in people), return_exceptions=True)
        wall = time.perf_counter() - started
    for p, outcome in zip(people, outcomes, strict=True):
        if isinstance(outcome, Exception) and not p.errors:
            p.errors.append(f"{type(outcome).__name__}: {outcome}")
    return people, wall


def scenario(agent: str, n: int, games: int, seed: int, workdir: Path, think: float) -> dict:
    name = agent.replace(":", "-").replace("/", "-")
    db = f"sqlite:///{workdir / f'bench-{name}.db'}"
    study = study_from_flags([agent], OBJECTIVE, games_per_participant=games)
    store = Store(db)
    tokens = [t for _, t in store.add_participants(study, n)]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = ["-m", "parlay", "serve", "--agent", agent, "--games", str(games), "--db", db, "--port", str(port)]
    server = start_process(cmd, f"{base}/api/me", env={"PARLAY_ADMIN_TOKEN": ADMIN}, timeout=300)
    try:
        people, wall = asyncio.run(drive(base, tokens, seed, think))
        summary = httpx.get(f"{base}/api/admin/summary", headers={"Authorization": f"Bearer {ADMIN}"}).json()
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    problems = verify(store, study.name, people, games)
    outcomes = Counter(row.episode["outcome"]["status"] for row in store.games(study.name) if row.episode)
    store.close()
    latencies = np.array([x for p in people for x in p.latencies]) * 1000
    replies = np.array([x for p in people for x in p.replies])
    worker = summary["workers"][agent]
    return {
        "agent": agent,
        "participants": n,
        "games": n * games,
        "wall": wall,
        "requests": len(latencies),
        "errors": sum(len(p.errors) for p in people),
        "problems": problems,
        "lat_p50": float(np.percentile(latencies, 50)),
        "lat_p95": float(np.percentile(latencies, 95)),
        "reply_p50": float(np.percentile(replies, 50)) if len(replies) else float("nan"),
        "reply_p95": float(np.percentile(replies, 95)) if len(replies) else float("nan"),
        "mean_batch": worker["mean_batch"],
        "batch_s": worker["act_seconds"] / max(1, worker["batches"]),
        "outcomes": ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())),
        "model_turns": worker["turns"],
        "first_errors": [e for p in people for e in p.errors][:3],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--participants", type=int, default=50, help="Against the bot (0: skip that part).")
    parser.add_argument("--games", type=int, default=3, help="Games per participant against the bot.")
    parser.add_argument("--bot", default="bot:cooperative")
    parser.add_argument("--model-participants", type=int, default=16)
    parser.add_argument("--model", default="hf:smollm2-135m")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--think", type=float, default=0.0, help="Mean seconds a participant waits before each move (0: none)."
    )
    parser.add_argument("--no-record", action="store_true", help="Print only; do not append to RESULTS.md.")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.participants:
            runs.append(scenario(args.bot, args.participants, args.games, args.seed, Path(tmp), args.think))
            print(runs[-1])
        if args.model_participants:
            runs.append(scenario(args.model, args.model_participants, 1, args.seed, Path(tmp), args.think))
            print(runs[-1])
    lines = [
        f"## serve — {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        f"Machine: {platform.machine()}, {os.cpu_count()} threads; server and all simulated participants on this "
        f"machine (loopback, SQLite WAL); objective semi-competitive; think time before each move: "
        f"{f'exponential, mean {args.think:g} s' if args.think else 'none'}.",
        "",
        "| partner | participants at once | games | wall s | requests | errors | lost or corrupted games "
        "| server latency p50 / p95 ms | partner's reply p50 / p95 s | model turns | mean batch | s per batch "
        "| outcomes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['agent']} | {r['participants']} | {r['games']} | {r['wall']:.0f} | {r['requests']} | {r['errors']} "
            f"| {len(r['problems'])} | {r['lat_p50']:.1f} / {r['lat_p95']:.1f} "
            f"| {r['reply_p50']:.2f} / {r['reply_p95']:.2f} | {r['model_turns']} | {r['mean_batch']:.1f} "
            f"| {r['batch_s']:.2f} | {r['outcomes']} |"
        )
    for r in runs:
        for problem in r["problems"][:5] + r["first_errors"]:
            lines.append(f"- {r['agent']}: {problem}")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_record:
        with RESULTS.open("a", encoding="utf-8") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
