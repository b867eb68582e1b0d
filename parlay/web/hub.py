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
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from parlay import prompts
from parlay.agents import load_agent
from parlay.agents.base import Agent, Reply
from parlay.episode import Episode
from parlay.games.dond import Context, objective
from parlay.protocol import Game
from parlay.rollout import act_safely, plan_games, play_games, turn_request
from parlay.web.store import GameRow, MoveConflict, ParticipantRow, Store
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
    version: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def bump(self) -> None:
        self.version += 1
        self.changed.set()
        self.changed = asyncio.Event()

    @property
    def model_to_move(self) -> bool:
        return self.game.current_player == MODEL


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
        game.end(row.ended["status"], row.ended["reason"])
    return game


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
                except Exception:  # a database outage must not stop the worker; the turn is asked again
                    log.exception("game %s: the model's reply could not be stored; asking again", live.row.id)
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

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(w.run(), name=f"worker {spec}") for spec, w in self.workers.items()]
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
        if live.game.is_terminal and row.status != "done":  # stopped between the last move and the record
            self.store.end_game(row.id, self._episode(live))
        return live

    # -- a participant's games

    async def next_game(self, participant: ParticipantRow) -> LiveGame | None:
        """The participant's live game, or a new one; None when all their games are played."""
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
            await asyncio.to_thread(self.store.create_game, row)
            live = await self.get(row.id)
            assert live is not None
            if live.model_to_move:
                self._worker(live).submit(live)
            return live

    # -- moves

    async def human_move(self, live: LiveGame, move_id: str, text: str) -> int:
        """Apply a person's reply; returns its turn index. A resent ``move_id`` is answered with
        the turn it already made and changes nothing."""
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
            try:
                await asyncio.to_thread(self.store.add_move, live.row.id, seq, HUMAN, text, None, move_id)
            except MoveConflict:
                raise NotNow("This turn was already taken; reload the page.") from None
            live.move_ids[move_id] = seq
            game.step(text)
            await self._after_move(live)
            return seq

    async def apply_model_reply(self, live: LiveGame, reply: Reply) -> None:
        async with live.lock:
            game = live.game
            if game.is_terminal or game.current_player != MODEL:
                return
            if reply.error is not None:
                ended = {"status": "failed", "reason": reply.error}
                await asyncio.to_thread(self.store.end_game, live.row.id, None, ended)
                game.end("failed", reply.error)
            else:
                await asyncio.to_thread(
                    self.store.add_move, live.row.id, len(game.turns), MODEL, reply.text, reply.tokens, None
                )
                game.step(reply.text, reply.tokens)
            await self._after_move(live)

    async def _after_move(self, live: LiveGame) -> None:
        if live.game.is_terminal:
            await asyncio.to_thread(self.store.end_game, live.row.id, self._episode(live))
        elif live.model_to_move:
            self._worker(live).submit(live)
        live.bump()

    def _episode(self, live: LiveGame) -> dict[str, Any]:
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
        return Episode.from_game(live.game, row.id, meta).model_dump(mode="json")

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
                "status": game.outcome.status,
                "reason": game.outcome.reason,
                "your_proposal": game.outcome.proposals.get(HUMAN),
                "partner_proposal": game.outcome.proposals.get(MODEL),
                "your_score": scores[0],
                "partner_score": scores[1],
                "your_reward": rewards[0],
                "partner_reward": rewards[1],
            }
        return view

    def stats(self) -> dict[str, Any]:
        return {spec: w.stats.as_dict() | {"queued": w.queue.qsize()} for spec, w in self.workers.items()}
