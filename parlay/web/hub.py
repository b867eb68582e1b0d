"""Live games of the web app, and the workers that play the models' turns in batches.

Every live game is a ``protocol.Game`` in memory, rebuilt from the database on first use by
replaying its stored moves (``Store``), so the referee of self-play is also the referee here.
A move — a person's or a model's — is stored first, then applied, then announced: the game's
``version`` goes up and whoever long-polls it is woken.

One ``ModelWorker`` runs per agent. When a game comes to the model's turn it is queued; the
worker takes everything queued (after a short wait for more to arrive), builds the turn requests
as rollouts do (``rollout.turn_request``), answers them with one ``Agent.act`` call in a thread,
and applies the replies. Fifty people playing one transformers model thus share one model in
memory and one batched forward; games that came due while a batch was decoding go in the next.
A rejected model reply is queued again with the protocol's feedback in its conversation, as in
self-play. After a restart every live game whose turn is the model's is queued again.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from parlay import prompts
from parlay.agents import load_agent
from parlay.agents.base import Agent, Reply
from parlay.episode import Episode
from parlay.games.dond import Context, objective
from parlay.protocol import Game
from parlay.rollout import act_safely, plan_games, play_games, turn_request
from parlay.web.store import GameRow, MoveConflict, ParticipantRow, Store, StoreUnavailable
from parlay.web.study import HUMAN, MODEL, Study, public_context

log = logging.getLogger(__name__)

TRIAL_PARTNER = "bot:conceder"
TRIAL_GAMES = 4


def trial(agent: Agent, objective_spec: str, max_messages: int, games: int = TRIAL_GAMES) -> str:
    """Play ``games`` seeded games of ``agent`` (as player B, its seat in a study) against the
    conceding bot before people meet it; return a warning when every one was aborted for rejected
    replies (a model that cannot speak the protocol: its games with people would all end so),
    else ``""``."""
    episodes = play_games(
        load_agent(TRIAL_PARTNER), agent, plan_games(games, seed=0), objective(objective_spec), max_messages
    )
    aborted = sum(e.outcome.status == "aborted" for e in episodes)
    if aborted < len(episodes):
        return ""
    return (
        f"{agent.spec} failed the protocol: all {aborted} trial games against {TRIAL_PARTNER} ({objective_spec}) "
        f"were aborted for rejected replies, so every game with a person would end the same way. Serve a "
        f"warm-started or trained model (run:DIR), not a raw one"
    )


class Refused(Exception):
    """A request the hub does not apply (nothing of it is stored). ``detail`` says why in words a
    participant reads; ``code`` names the reason for the page (the protocol's error code where the
    referee refused). The kinds below say what went wrong; the web app maps each to its HTTP status."""

    def __init__(self, detail: str, code: str | None = None) -> None:
        super().__init__(detail)
        self.detail, self.code = detail, code


class NoSuchGame(Refused):
    """No game by that id for this participant (the same answer for someone else's game)."""


class NotNow(Refused):
    """The request does not fit the state of the game or of the participant now (the game is over,
    it is the partner's turn, a step is not open yet)."""


class InvalidMove(Refused):
    """The move breaks the rules or the study's limits; the same move will always be refused."""


class Unavailable(Refused):
    """The study's storage could not record the change: nothing was applied; try again later."""


@dataclass
class LiveGame:
    row: GameRow
    game: Game
    participant: int
    """The participant's number (for records; their database id is ``row.participant_id``)."""
    move_ids: dict[str, int] = field(default_factory=dict)
    """The browser's move ids already applied → their turn index (a resend is answered, not applied)."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def version(self) -> int:
        """What a page orders views by: the stored turns, plus one once the game is over. It is
        derived from the stored moves, so it is the same after a restart and never goes back."""
        return len(self.game.turns) + int(self.game.is_terminal)

    def bump(self) -> None:
        """Wake everyone waiting for a change of this game."""
        self.changed.set()
        self.changed = asyncio.Event()

    @property
    def model_to_move(self) -> bool:
        return self.game.current_player == MODEL


OUTSIDE_ENDS = {"failed": "failed", "abandoned": "no_deal"}
"""An outside end as the web app records it → as the game core ends the game (a person who left
walked away: no deal)."""


def replay(row: GameRow, moves: list[Any]) -> Game:
    """The game as its stored moves left it."""
    game = Game(Context.from_dict(row.context), objective(row.lam), row.first_speaker, row.max_messages)
    for move in moves:
        if game.is_terminal:
            raise RuntimeError(f"game {row.id}: stored move {move.seq} comes after the end")
        if move.seq != len(game.turns):
            raise RuntimeError(f"game {row.id}: stored move {move.seq} where turn {len(game.turns)} was expected")
        game.step(move.text, move.tokens)
    if row.ended and not game.is_terminal:
        game.end(OUTSIDE_ENDS[row.ended["status"]], row.ended["reason"])  # type: ignore[arg-type]
    return game


def abandoned(row: GameRow) -> bool:
    """Whether the game ended because its person left (timeout or the admin)."""
    return bool(row.ended) and row.ended.get("status") == "abandoned"  # type: ignore[union-attr]


@dataclass
class WorkerStats:
    batches: int = 0
    turns: int = 0
    seconds: float = 0.0
    """Time spent inside ``Agent.act``."""

    def as_dict(self) -> dict[str, Any]:
        mean = self.turns / self.batches if self.batches else 0.0
        return {"batches": self.batches, "turns": self.turns, "mean_batch": mean, "act_seconds": self.seconds}


class ModelWorker:
    """Answers every pending turn of one agent, batched."""

    def __init__(self, agent: Agent, hub: Hub, batch_wait: float) -> None:
        self.agent, self.hub, self.batch_wait = agent, hub, batch_wait
        self.queue: asyncio.Queue[LiveGame] = asyncio.Queue()
        self.stats = WorkerStats()

    def submit(self, live: LiveGame) -> None:
        self.queue.put_nowait(live)

    async def run(self) -> None:
        while True:
            batch = [await self.queue.get()]
            if self.batch_wait:
                await asyncio.sleep(self.batch_wait)
            while not self.queue.empty():
                batch.append(self.queue.get_nowait())
            due = list({id(g): g for g in batch if g.model_to_move}.values())
            if not due:
                continue
            requests = [turn_request(g.game, g.row.id, g.row.seed) for g in due]
            started = time.perf_counter()
            replies = await asyncio.to_thread(act_safely, self.agent, requests)
            self.stats.seconds += time.perf_counter() - started
            self.stats.batches += 1
            self.stats.turns += len(requests)
            for live, reply in zip(due, replies, strict=True):
                try:
                    await self.hub.apply_model_reply(live, reply)
                except Exception as exc:  # a database outage must not stop the worker; the turn is asked again
                    log.warning("game %s: the model's reply could not be stored (%s); asking again", live.row.id, exc)
                    await asyncio.sleep(1.0)
                    self.submit(live)


class Hub:
    """The live games and the model workers of one study."""

    def __init__(self, study: Study, store: Store, agents: dict[str, Agent], batch_wait: float = 0.02) -> None:
        self.study, self.store = study, store
        self.workers = {spec: ModelWorker(agent, self, batch_wait) for spec, agent in agents.items()}
        self.games: dict[str, LiveGame] = {}
        self._tasks: list[asyncio.Task] = []
        self._loading: dict[str, asyncio.Lock] = {}
        self._participant_locks: dict[int, asyncio.Lock] = {}
        self.clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC).replace(tzinfo=None)
        """The time abandonment is judged by (the store's naive UTC); tests move it."""

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(w.run(), name=f"worker {spec}") for spec, w in self.workers.items()]
        if self.study.abandon_after_minutes is not None:
            self._tasks.append(asyncio.create_task(self._sweep_forever(), name="abandonment"))
        rows = await asyncio.to_thread(self.store.games, self.study.name, "live")
        for row in rows:
            live = await self.get(row.id)
            if live is not None and live.model_to_move:
                self._worker(live).submit(live)
        if rows:
            log.info("resumed %d live games", len(rows))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _worker(self, live: LiveGame) -> ModelWorker:
        return self.workers[self.study.conditions[live.row.condition].agent]

    # -- loading

    async def get(self, game_id: str) -> LiveGame | None:
        """The game, replayed from the database on first use; None if there is no such game."""
        if game_id in self.games:
            return self.games[game_id]
        try:
            async with self._loading.setdefault(game_id, asyncio.Lock()):
                if game_id not in self.games:
                    loaded = await asyncio.to_thread(self._load, game_id)
                    if loaded is None:
                        return None
                    self.games[game_id] = loaded
        finally:
            self._loading.pop(game_id, None)  # ids asked for in vain must not pile up
        return self.games[game_id]

    def _load(self, game_id: str) -> LiveGame | None:
        row = self.store.game(game_id)
        if row is None:
            return None
        moves = self.store.moves(game_id)
        owner = self.store.participant_by_id(row.participant_id)
        assert owner is not None
        live = LiveGame(row, replay(row, moves), owner.number, {m.move_id: m.seq for m in moves if m.move_id})
        if live.game.is_terminal and row.status != "done":  # a database written by an earlier parlay
            self.store.end_game(row.id, self._episode(live, live.game))
        return live

    async def _write(self, change: Callable[..., Any], *args: Any) -> Any:
        """A store transaction from a worker thread; a store that could not take it is an
        ``Unavailable`` refusal (nothing applied, nothing acknowledged)."""
        try:
            return await asyncio.to_thread(change, *args)
        except StoreUnavailable as exc:
            raise Unavailable(
                f"Your move could not be saved ({exc}). Nothing was recorded; please try again in a moment.",
                "storage",
            ) from None

    # -- a participant's games

    async def next_game(self, participant: ParticipantRow) -> LiveGame | None:
        """The participant's live game, or a new one; None when all their games are played."""
        if participant.ended_at is not None:  # the admin ended their part
            return None
        lock = self._participant_locks.setdefault(participant.id, asyncio.Lock())
        async with lock:
            rows = await asyncio.to_thread(self.store.games_of, participant.id)
            for row in rows:
                if row.status == "live":
                    return await self.get(row.id)
            number = len(rows)
            if number >= self.study.games_per_participant:
                return None
            condition = self.study.conditions_of(participant.number)[number]
            spec = self.study.game_plan(participant.number, number)
            chosen = self.study.conditions[condition]
            row = GameRow(
                id=f"{self.study.name}-p{participant.number:05d}-g{number:02d}",
                participant_id=participant.id,
                number=number,
                condition=condition,
                agent=chosen.agent,
                lam=chosen.game_objective.lam,
                context=spec.context.to_dict(),
                first_speaker=spec.first_speaker,
                seed=spec.seed,
                max_messages=self.study.max_messages,
            )
            await self._write(self.store.create_game, row)
            live = await self.get(row.id)
            assert live is not None
            if live.model_to_move:
                self._worker(live).submit(live)
            return live

    # -- moves

    async def human_move(self, live: LiveGame, move_id: str, text: str) -> int:
        """Apply a person's reply; returns its turn index. A resent ``move_id`` is answered with
        the turn it already made and changes nothing. The move (and the game's end, when it ends
        it) is stored in one transaction before it is applied in memory: a move whose transaction
        fails is refused (``Unavailable``) and the game stays as it was."""
        async with live.lock:
            if move_id in live.move_ids:
                return live.move_ids[move_id]
            game = live.game
            if game.is_terminal:
                raise NotNow("This game is over.")
            if game.current_player != HUMAN:
                raise NotNow("It is your partner's turn: wait for their reply.")
            error = game.check(text)
            if error is not None:
                raise InvalidMove(game.feedback(error), error.code.value)
            seq = len(game.turns)
            after = copy.deepcopy(game)
            after.step(text)
            episode = self._episode(live, after) if after.is_terminal else None
            try:
                await self._write(self.store.add_move, live.row.id, seq, HUMAN, text, None, move_id, episode)
            except MoveConflict:
                raise NotNow("This turn was already taken; reload the page.") from None
            live.move_ids[move_id] = seq
            self._applied(live, after)
            return seq

    async def apply_model_reply(self, live: LiveGame, reply: Reply) -> None:
        """Store, then apply, the model's reply (one transaction with the game's end when it ends
        it); a failed transaction leaves the game as it was (the worker asks again)."""
        async with live.lock:
            game = live.game
            if game.is_terminal or game.current_player != MODEL:
                return
            after = copy.deepcopy(game)
            if reply.error is not None:
                after.end("failed", reply.error)
                ended = {"status": "failed", "reason": reply.error}
                await self._write(self.store.end_game, live.row.id, self._episode(live, after), ended)
            else:
                after.step(reply.text, reply.tokens)
                episode = self._episode(live, after) if after.is_terminal else None
                seq = len(game.turns)
                await self._write(self.store.add_move, live.row.id, seq, MODEL, reply.text, reply.tokens, None, episode)
            self._applied(live, after)

    async def abandon(self, live: LiveGame, reason: str) -> bool:
        """End a live game whose person left (the study's timeout, or the admin): recorded as
        ``abandoned`` (the game core's no-deal walk-away) with ``reason``; False if it was over."""
        async with live.lock:
            if live.game.is_terminal:
                return False
            after = copy.deepcopy(live.game)
            after.end("no_deal", reason)
            ended = {"status": "abandoned", "reason": reason}
            await self._write(self.store.end_game, live.row.id, self._episode(live, after), ended)
            live.row.ended = ended
            self._applied(live, after)
            return True

    def _applied(self, live: LiveGame, game: Game) -> None:
        """The stored change, now in memory: the next turn queued, the waiting pages woken."""
        live.game = game
        if game.is_terminal:
            live.row.status = "done"
        elif live.model_to_move:
            self._worker(live).submit(live)
        live.bump()

    # -- abandonment

    async def sweep(self) -> list[str]:
        """Abandon every live game of the study that has waited for its person longer than the
        study's ``abandon_after_minutes`` (never one waiting for the model); their ids."""
        limit = self.study.abandon_after_minutes
        if limit is None:
            return []
        cutoff = self.clock() - dt.timedelta(minutes=limit)
        ended = []
        for row in await asyncio.to_thread(self.store.games, self.study.name, "live"):
            if row.updated_at > cutoff:
                continue
            live = await self.get(row.id)
            if live is None or live.model_to_move:
                continue
            reason = f"abandoned: no move from the participant for {limit:g} minutes"
            if await self.abandon(live, reason):
                log.info("game %s %s", row.id, reason)
                ended.append(row.id)
        return ended

    async def _sweep_forever(self) -> None:
        assert self.study.abandon_after_minutes is not None
        period = min(60.0, self.study.abandon_after_minutes * 60 / 4)
        while True:
            await asyncio.sleep(period)
            try:
                await self.sweep()
            except Exception as exc:  # a database outage: try again at the next sweep
                log.warning("the abandonment sweep failed: %s", exc)

    def _episode(self, live: LiveGame, game: Game) -> dict[str, Any]:
        row, condition = live.row, self.study.conditions[live.row.condition]
        meta = {
            "agents": {HUMAN: "human", MODEL: row.agent},
            "human": HUMAN,
            "source": "web",
            "study": self.study.name,
            "condition": condition.name,
            "participant": live.participant,
            "game_number": row.number,
            "seed": row.seed,
        }
        return Episode.from_game(game, row.id, meta).model_dump(mode="json")

    # -- what a participant sees

    def view(self, live: LiveGame) -> dict[str, Any]:
        """The participant's view of their game. It holds their own values only: nothing of the
        partner's values, of the partner's rejected attempts or (until the end) of its proposal."""
        game, row = live.game, live.row
        chat: list[dict[str, Any]] = []
        for turn in game.turns:
            if not turn.accepted:
                continue
            who = "you" if turn.player == HUMAN else "partner"
            if turn.kind == "message":
                chat.append({"from": who, "kind": "message", "text": turn.message})
            elif who == "you":
                chat.append({"from": who, "kind": "proposal", "kept": turn.proposal})
            else:
                chat.append({"from": who, "kind": "proposal"})
        view: dict[str, Any] = {
            "id": row.id,
            "number": row.number + 1,
            "of": self.study.games_per_participant,
            "version": live.version,
            **public_context(game.context, HUMAN),
            "objective": prompts.objective_text(game.objective),
            "max_messages": game.max_messages,
            "messages": game.n_messages,
            "max_message_chars": self.study.max_message_chars,
            "chat": chat,
            "finished": game.is_terminal,
            "your_turn": game.current_player == HUMAN,
            "partner_typing": live.model_to_move,
            "proposal_owed": game.current_player == HUMAN and game.proposal_owed,
            "may_propose": game.n_messages > 0,
        }
        if game.is_terminal:
            assert game.outcome is not None
            scores, rewards = game.raw_scores, game.rewards
            view["result"] = {
                "status": "abandoned" if abandoned(row) else game.outcome.status,
                "reason": game.outcome.reason,
                "your_proposal": game.outcome.proposals.get(HUMAN),
                "partner_proposal": game.outcome.proposals.get(MODEL),
                "your_score": scores[0],
                "partner_score": scores[1],
                "your_reward": rewards[0],
                "partner_reward": rewards[1],
            }
        return view

    async def in_progress(self, numbers: dict[int, int]) -> list[dict[str, Any]]:
        """The study's live games as the admin watches them: whose game (``numbers``: participant
        id → number), its condition, turns so far, whose turn it is, and how long since the last
        move (or the start) and, while it waits for its person, until the study's timeout ends it."""
        now, limit = self.clock(), self.study.abandon_after_minutes
        out = []
        for row in await asyncio.to_thread(self.store.games, self.study.name, "live"):
            live = await self.get(row.id)
            if live is None or live.game.is_terminal:
                continue
            waiting = max(0.0, (now - row.updated_at).total_seconds())
            person = live.game.current_player == HUMAN
            out.append(
                {
                    "game": row.id,
                    "participant": numbers.get(row.participant_id),
                    "game_number": row.number + 1,
                    "condition": self.study.conditions[row.condition].name,
                    "turns": len(live.game.turns),
                    "messages": live.game.n_messages,
                    "to_move": "person" if person else "model",
                    "proposal_owed": live.game.proposal_owed,
                    "since_last_move_s": round(waiting, 1),
                    "abandons_in_s": round(max(0.0, limit * 60 - waiting), 1) if person and limit else None,
                }
            )
        return out

    def stats(self) -> dict[str, Any]:
        return {spec: w.stats.as_dict() | {"queued": w.queue.qsize()} for spec, w in self.workers.items()}
