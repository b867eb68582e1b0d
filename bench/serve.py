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

    python bench/serve.py --faults              # 30 participants through kills and storage faults

The **fault mode** runs the server as ``tests/web_server.py`` (``parlay serve`` with a fault hook on
its store) against bots, so it needs no model and runs on a CPU in a minute or two. While the
participants play, the server process is killed (SIGKILL) when a third and again when two thirds
of all games have finished, and started again at once on the same database and port; all along,
every K-th write (moves, new games, participant marks) fails all its tries, so the server refuses
it with 503 and applies nothing. The participants behave as the page does: a request that meets
no server is sent again until it is answered, and a refused (503) move is sent again with the same
move id. Measured: participants **stuck** (not every game finished in the database at the end),
**acknowledged moves lost** (a move answered 2xx that is not stored with its seq, id and text),
**time to recover** after each restart (seconds from the kill to the first 2xx any participant
gets), the refused moves the clients resent, and the same lost-or-corrupted check as above.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import signal
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


class Watch:
    """The fault mode's clock: when the server was killed, and when a participant was next answered."""

    def __init__(self) -> None:
        self.kills: list[float] = []
        self.recovered: list[float | None] = []
        """Per kill: the time of the first 2xx after it (None until then)."""

    def killed(self) -> None:
        self.kills.append(time.perf_counter())
        self.recovered.append(None)

    def answered(self, sent: float) -> None:
        """A 2xx to a request sent at ``sent``; only a request sent after the last kill shows
        recovery (an answer already on its way when the server died is read after the kill)."""
        if self.recovered and self.recovered[-1] is None and sent > self.kills[-1]:
            self.recovered[-1] = time.perf_counter()

    def recovery_seconds(self) -> list[float | None]:
        return [None if r is None else r - k for k, r in zip(self.kills, self.recovered, strict=True)]


class Participant:
    def __init__(
        self, client: httpx.AsyncClient, token: str, seed: int, think: float, watch: Watch | None = None
    ) -> None:
        self.client, self.headers, self.think = client, {"Authorization": f"Bearer {token}"}, think
        self.rng = np.random.default_rng(seed)
        self.latencies: list[float] = []
        self.replies: list[float] = []
        self.errors: list[str] = []
        self.sent: dict[str, list[str]] = {}
        """Game id → the texts of the person's acknowledged moves."""
        self.acked: list[tuple[str, int, str, str]] = []
        """(game id, seq, move id, text) of every move answered 2xx."""
        self.watch = watch
        """Set in the fault mode: requests that meet no server, or a 503, are sent again."""
        self.games_finished = 0
        self.resent_moves = 0
        """Moves refused with 503 and sent again (the fault mode)."""
        self.resent_other = 0
        """Other requests refused with 503 (a new game, a participant's step) and sent again."""
        self.rate_limited = 0
        self.moves_unanswered = 0
        """Moves sent again because no answer came (the server died before, while or after storing it)."""
        self.no_server = 0
        """Requests that met no server (killed or starting) and were sent again."""

    async def call(self, method: str, path: str, timed: bool = True, **kwargs) -> dict:
        missed = False
        while True:
            started = time.perf_counter()
            try:
                response = await self.client.request(method, path, headers=self.headers, **kwargs)
            except httpx.TransportError:
                if self.watch is None:
                    raise
                self.no_server += 1
                self.moves_unanswered += path.endswith("/moves") and not missed
                missed = True
                await asyncio.sleep(0.1)
                continue
            if self.watch is not None and response.status_code in (429, 503):
                if response.status_code == 429:
                    self.rate_limited += 1
                elif path.endswith("/moves"):
                    self.resent_moves += 1
                else:
                    self.resent_other += 1
                await asyncio.sleep(0.2)
                continue
            break
        if timed:
            self.latencies.append(time.perf_counter() - started)
        if response.status_code >= 300:
            self.errors.append(f"{method} {path}: {response.status_code} {response.text[:200]}")
            raise RuntimeError(self.errors[-1])
        if self.watch is not None:
            self.watch.answered(started)
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
            answer = await self.call("POST", f"/api/games/{game['id']}/moves", json=body)
            game = answer["game"]
            self.sent[game["id"]].append(text)
            self.acked.append((game["id"], answer["seq"], body["move_id"], text))
            moves += 1
            acked, seen = time.perf_counter(), len(game["chat"])
            while not game["finished"] and not game["your_turn"]:
                game = await self.call("GET", f"/api/games/{game['id']}?after={game['version']}", timed=False)
            if any(line["from"] == "partner" for line in game["chat"][seen:]):  # not when it never answered
                self.replies.append(time.perf_counter() - acked)
        self.games_finished += 1


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


class Server:
    """``tests/web_server.py`` as a process that can be killed and started again on the same port."""

    def __init__(self, args: list[str], base: str, log: Path) -> None:
        self.args, self.base, self.log = args, base, log
        self.proc: subprocess.Popen | None = None
        self.starts: list[float] = []
        """Seconds from each start to serving."""

    def start(self) -> None:
        started = time.perf_counter()
        self.proc = start_process(self.args, f"{self.base}/api/me", timeout=300, log=self.log)
        self.starts.append(time.perf_counter() - started)

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def lost_moves(store: Store, participants: list[Participant]) -> list[str]:
    """Acknowledged moves that are not stored as acknowledged (game, seq, move id and text)."""
    stored = {}
    for game_id in {a[0] for p in participants for a in p.acked}:
        stored |= {(game_id, m.seq): (m.move_id, m.text) for m in store.moves(game_id)}
    return [
        f"{game_id} turn {seq} ({move_id})"
        for p in participants
        for game_id, seq, move_id, text in p.acked
        if stored.get((game_id, seq)) != (move_id, text)
    ]


async def drive_through_faults(
    server: Server, tokens: list[str], seed: int, think: float, games: int, kills: int, deadline: float
) -> tuple[list[Participant], float, Watch]:
    """The participants play while the server is killed and started again ``kills`` times, at
    evenly spaced shares of all games finished; a participant not done by ``deadline`` s is stuck."""
    watch = Watch()
    limits = httpx.Limits(max_connections=4 * len(tokens), max_keepalive_connections=4 * len(tokens))
    async with httpx.AsyncClient(base_url=server.base, timeout=30, limits=limits) as client:
        people = [Participant(client, t, seed + i, think, watch) for i, t in enumerate(tokens)]
        total = len(people) * games

        async def chaos() -> None:
            for k in range(1, kills + 1):
                while sum(p.games_finished for p in people) < total * k / (kills + 1):
                    await asyncio.sleep(0.02)
                watch.killed()
                server.kill()
                await asyncio.to_thread(server.start)

        started = time.perf_counter()
        killer = asyncio.create_task(chaos())
        runs = [asyncio.wait_for(p.run(), deadline) for p in people]
        outcomes = await asyncio.gather(*runs, return_exceptions=True)
        wall = time.perf_counter() - started
        if not killer.done():  # every participant finished (or stuck) before all kills: say so
            killer.cancel()
        await asyncio.gather(killer, return_exceptions=True)
    for p, outcome in zip(people, outcomes, strict=True):
        if isinstance(outcome, BaseException) and not p.errors:
            p.errors.append(f"{type(outcome).__name__}: {outcome}")
    return people, wall, watch


def fault_scenario(args: argparse.Namespace, workdir: Path) -> dict:
    agents = ["bot:hard", "bot:cooperative"]
    db = f"sqlite:///{workdir / 'bench-faults.db'}"
    study = study_from_flags(agents, OBJECTIVE, games_per_participant=args.games)
    store = Store(db)
    tokens = [t for _, t in store.add_participants(study, args.participants)]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = ["-m", "tests.web_server", "--db", db, "--port", str(port), "--agents", ",".join(agents)]
    cmd += ["--games", str(args.games), "--admin-token", ADMIN, "--objective", OBJECTIVE]
    cmd += ["--fail-every", str(args.fail_every), "--fail-tries", "3", "--fail-writes", FAULTY_WRITES]
    server = Server(cmd, base, workdir / "server.log")
    server.start()
    try:
        people, wall, watch = asyncio.run(
            drive_through_faults(server, tokens, args.seed, args.think, args.games, args.kills, args.deadline)
        )
        summary = httpx.get(f"{base}/api/admin/summary", headers={"Authorization": f"Bearer {ADMIN}"}).json()
    finally:
        server.stop()
    by_person = {p.number: p for p in store.participants(study.name)}
    done = Counter(
        row.participant_id for row in store.games(study.name) if row.status == "done" and row.episode is not None
    )
    stuck = [n for n, p in by_person.items() if done[p.id] < args.games]
    lost = lost_moves(store, people)
    problems = verify(store, study.name, people, args.games)
    store.close()
    log = server.log.read_text(errors="replace")
    return {
        "model_retried": log.count("the model's reply could not be stored"),
        "participants": len(people),
        "games": len(people) * args.games,
        "wall": wall,
        "kills": len(watch.kills),
        "recovery": watch.recovery_seconds(),
        "starts": server.starts,
        "stuck": stuck,
        "acked": sum(len(p.acked) for p in people),
        "lost": lost,
        "resent_moves": sum(p.resent_moves for p in people),
        "resent_other": sum(p.resent_other for p in people),
        "rate_limited": sum(p.rate_limited for p in people),
        "moves_unanswered": sum(p.moves_unanswered for p in people),
        "no_server": sum(p.no_server for p in people),
        "problems": problems,
        "errors": [e for p in people for e in p.errors],
        "live_at_end": sum(c["live"] for c in summary["conditions"]),
    }


FAULTY_WRITES = "add_move,create_game,mark"
"""The store's transactions the fault mode fails: moves, new games, participants' steps."""


def machine() -> str:
    """The CPU by name, with its vector extensions, and the commit of the code measured."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    vectors = ", ".join(
        f"{'' if flag in flags else 'no '}{label}" for flag, label in (("avx2", "AVX2"), ("avx512f", "AVX-512"))
    )
    git = ["git", "-C", str(ROOT)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    mine = ["parlay/web", "bench/serve.py", "tests/web_server.py"]
    dirty = subprocess.run([*git, "status", "--porcelain", "--", *mine], capture_output=True, text=True).stdout
    return (
        f"{name or platform.processor() or platform.machine()} ({vectors}), {os.cpu_count()} cores; commit "
        f"{commit}{' with uncommitted changes to the web app or this script' if dirty.strip() else ''}"
    )


def record_faults(r: dict, args: argparse.Namespace) -> str:
    recovery = " / ".join("never" if x is None else f"{x:.2f}" for x in r["recovery"])
    starts = " / ".join(f"{x:.2f}" for x in r["starts"][1:])
    lines = [
        f"## serve, fault mode — {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        f"Machine: {machine()}. Server (`tests/web_server.py`, bot:hard and bot:cooperative as the model "
        f"agents) and all simulated participants on this machine (loopback, SQLite WAL); objective "
        f"{OBJECTIVE}; think time before each move: exponential, mean {args.think:g} s. The server was killed "
        f"(SIGKILL) {r['kills']} times, at evenly spaced shares of the games finished, and started again at "
        f"once; every {args.fail_every}th write ({FAULTY_WRITES.replace(',', ', ')}) failed all 3 of its tries.",
        "",
        "| participants | games | wall s | kills | recovery after each restart s | of it, server start s "
        "| participants stuck | moves acknowledged | acknowledged moves lost | refused (503) moves resent "
        "| other 503 resent | model replies refused, asked again | 429 | requests that met no server "
        "| of them moves | lost or corrupted games |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {r['participants']} | {r['games']} | {r['wall']:.0f} | {r['kills']} | {recovery} | {starts} "
        f"| {len(r['stuck'])} | {r['acked']} | {len(r['lost'])} | {r['resent_moves']} | {r['resent_other']} "
        f"| {r['model_retried']} | {r['rate_limited']} | {r['no_server']} | {r['moves_unanswered']} "
        f"| {len(r['problems'])} |",
    ]
    stuck = [f"stuck: participants {r['stuck']}"] if r["stuck"] else []
    for problem in stuck + r["lost"][:5] + r["problems"][:5]:
        lines.append(f"- {problem}")
    lines += [f"- {e}" for e in r["errors"][:5]]
    return "\n".join(lines) + "\n"


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
    faults = parser.add_argument_group("fault mode")
    faults.add_argument(
        "--faults",
        action="store_true",
        help="Kill and restart the server and fail writes while participants play (defaults: 30 participants, "
        "3 games each, think 0.3 s).",
    )
    faults.add_argument("--kills", type=int, default=2, help="Times the server is killed and started again.")
    faults.add_argument("--fail-every", type=int, default=40, help="Every K-th write fails all its tries.")
    faults.add_argument("--deadline", type=float, default=300.0, help="Seconds after which a participant is stuck.")
    args = parser.parse_args()
    if args.faults:
        if "--participants" not in sys.argv:
            args.participants = 30
        if "--think" not in sys.argv:
            args.think = 0.3
        with tempfile.TemporaryDirectory() as tmp:
            result = fault_scenario(args, Path(tmp))
        text = record_faults(result, args)
        print(text)
        if not args.no_record:
            with RESULTS.open("a", encoding="utf-8") as f:
                f.write("\n" + text)
        return
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
