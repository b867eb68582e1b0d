"""Games spread over Ray actors, each owning its agents; episodes come back streamed, in plan order.

``RayPool.play_matches`` has the signature of ``rollout.play_matches``, so a round of the loop
and a tournament play through either without knowing which. The matches' agents are
``RemoteAgent`` placeholders (a spec and its sampling): this process loads no model. The games
are cut into chunks (two per worker, so a fast worker takes more); each actor loads the agents a
chunk names (once: it keeps them for later chunks) and plays the chunk with the ordinary batched
``rollout.play_matches``, yielding each episode as it finishes (a Ray streaming generator).
This process writes every episode through the match's own writer — the one writer, as in
process — in plan order: an episode is written once every match before it is written.

A worker that dies (its process killed, its node lost) fails its chunk; the games of that chunk
not yet received are queued again and played elsewhere (by the same seeds, so they are the
same games), and the dead actor is replaced. An episode is written only once, whoever played
it. An error of the agents themselves (a spec that cannot be loaded) is not retried: it is
raised as it is.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import socket
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from parlay.agents import Agent, load_agent
from parlay.agents.base import Reply, Sampling, TurnRequest
from parlay.episode import Episode
from parlay.errors import ConfigError
from parlay.games.dond import DEFAULT_MAX_MESSAGES, MAX_REPLY_CHARS, Objective
from parlay.rollout import GameSpec, Match, play_matches
from parlay.specs import AgentSpec, as_spec

log = logging.getLogger(__name__)

MAX_WORKER_FAILURES = 3
"""Times the same games may be lost with a dead worker before the round gives up."""
CHUNKS_PER_WORKER = 2


class DistributedError(RuntimeError):
    """Games that could not be played on the cluster (workers kept dying)."""


class RemoteAgent(Agent):
    """Stands for an agent that Ray workers load and play: a spec and its sampling. It cannot act
    in this process."""

    def __init__(self, spec: AgentSpec | str, sampling: Sampling) -> None:
        self.agent_spec = as_spec(spec)
        """What the workers load (typed; ``spec`` is its text, as every agent's)."""
        self.spec, self.sampling = str(spec), sampling

    def act(self, requests: list[TurnRequest]) -> list[Reply]:
        raise RuntimeError(f"{self.spec} is played by Ray workers, not in this process")


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("rollout.workers needs Ray, which is not installed: pip install 'parlay[ray]'") from None
    return ray


class _Tagged:
    """Stands in a worker for a match's writer: hands each finished episode, with the match's
    index in the caller's list, to the stream going back."""

    def __init__(self, index: int, out: queue.Queue) -> None:
        self.index, self.out = index, out

    def write(self, episode: Episode) -> None:
        self.out.put((self.index, episode.model_dump(mode="json")))


def _worker_class(ray: Any) -> Any:
    @ray.remote(num_cpus=1, max_restarts=0)
    class RolloutWorker:
        """Plays chunks of games; loads each agent spec once and keeps it."""

        def __init__(self) -> None:
            self.agents: dict[tuple[str, Sampling], Agent] = {}
            """Loaded agents, by their spec's text and sampling."""

        def pid(self) -> int:
            return os.getpid()

        def play(
            self,
            chunk: list[tuple[int, GameSpec, AgentSpec, AgentSpec, dict]],
            samplings: dict[str, Sampling],
            objective: Objective,
            max_messages: int | None,
            max_reply_chars: int | None,
        ) -> Iterator[tuple[int, dict]]:
            finished: queue.Queue = queue.Queue()
            matches = [
                Match(game, self._agent(a, samplings), self._agent(b, samplings), meta, _Tagged(i, finished))
                for i, game, a, b, meta in chunk
            ]

            def run() -> None:
                try:
                    play_matches(matches, objective, max_messages, None, max_reply_chars)
                    finished.put(None)
                except BaseException as exc:  # raised in the caller, below
                    finished.put(exc)

            threading.Thread(target=run, daemon=True).start()
            while (item := finished.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item

        def _agent(self, spec: AgentSpec, samplings: dict[str, Sampling]) -> Agent:
            key = (str(spec), samplings[str(spec)])
            if key not in self.agents:
                self.agents[key] = load_agent(spec, key[1])
            return self.agents[key]

    return RolloutWorker


def _check_reachable(address: str) -> None:
    """Fail fast on a Ray address nobody answers at (``ray.init`` would wait for minutes)."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"rollout.ray_address {address!r}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise ConfigError(f"rollout.ray_address {address!r}: cannot reach a Ray cluster there ({exc})") from None


def _sent(i: int, m: Match) -> tuple[int, GameSpec, AgentSpec, AgentSpec, dict]:
    """What a worker is sent of match ``i``: the game, the two agents' specs, the metadata."""
    return i, m.game, m.a.agent_spec, m.b.agent_spec, m.meta  # type: ignore[attr-defined]


@dataclass
class _Running:
    actor: Any
    indices: list[int]


class RayPool:
    """``workers`` Ray actors, on a local Ray instance or the cluster at ``address``."""

    def __init__(self, workers: int, address: str | None = None) -> None:
        if workers < 1:
            raise ConfigError(f"rollout.workers must be at least 1 to use Ray, got {workers}")
        self.ray = ray = import_ray()
        if not ray.is_initialized():
            if address:
                _check_reachable(address)
            try:
                if address:
                    ray.init(address=address, include_dashboard=False, log_to_driver=False)
                else:
                    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ConfigError(f"rollout.ray_address {address!r}: cannot reach a Ray cluster: {exc}") from None
        cpus = ray.cluster_resources().get("CPU", 0)
        if workers > cpus:
            raise ConfigError(f"rollout.workers is {workers} but the Ray cluster has {cpus:g} CPUs for workers")
        self._cls = _worker_class(ray)
        self.actors = [self._cls.remote() for _ in range(workers)]
        self.replaced = 0
        """Dead workers replaced so far."""
        self.replayed = 0
        """Games played again because their worker died before finishing them."""

    def pids(self) -> list[int]:
        """The worker processes' ids (the tests kill one)."""
        return self.ray.get([a.pid.remote() for a in self.actors])

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []

    def play_matches(
        self,
        matches: Sequence[Match],
        objective: Objective,
        max_messages: int | None = DEFAULT_MAX_MESSAGES,
        on_episode: Callable[[Episode], None] | None = None,
        max_reply_chars: int | None = MAX_REPLY_CHARS,
    ) -> list[Episode]:
        """``rollout.play_matches`` on the workers: every match played once, episodes written
        and reported in the order of ``matches``, returned in that order."""
        ray = self.ray
        samplings = {}
        for m in matches:
            for agent in (m.a, m.b):
                if not isinstance(agent, RemoteAgent):
                    raise TypeError(f"{agent.spec}: agents played by Ray workers must be RemoteAgent placeholders")
                samplings[agent.spec] = agent.sampling
        size = max(1, math.ceil(len(matches) / (CHUNKS_PER_WORKER * len(self.actors))))
        todo = deque(list(range(i, min(i + size, len(matches)))) for i in range(0, len(matches), size))
        idle = deque(self.actors)
        running: dict[int, _Running] = {}
        events: queue.Queue = queue.Queue()
        results: dict[int, Episode] = {}
        failures = 0
        emitted = 0
        next_chunk = 0

        def stream(chunk_id: int, refs: Any) -> None:
            try:
                for ref in refs:
                    events.put(("episode", chunk_id, ray.get(ref)))
                events.put(("done", chunk_id, None))
            except Exception as exc:
                events.put(("failed", chunk_id, exc))

        while emitted < len(matches):
            while todo and idle:
                indices, actor = todo.popleft(), idle.popleft()
                payload = [_sent(i, matches[i]) for i in indices]
                refs = actor.play.options(num_returns="streaming").remote(
                    payload, samplings, objective, max_messages, max_reply_chars
                )
                running[next_chunk] = _Running(actor, indices)
                threading.Thread(target=stream, args=(next_chunk, refs), daemon=True).start()
                next_chunk += 1
            kind, chunk_id, data = events.get()
            if kind == "episode":
                i, episode = data
                if i not in results:
                    results[i] = Episode.model_validate(episode)
                while emitted in results:  # the one writer, in plan order
                    m, ep = matches[emitted], results[emitted]
                    if m.writer is not None:
                        m.writer.write(ep)
                    if on_episode is not None:
                        on_episode(ep)
                    emitted += 1
            elif kind == "done":
                idle.append(running.pop(chunk_id).actor)
            else:
                lost = running.pop(chunk_id)
                if not isinstance(data, ray.exceptions.RayActorError):
                    raise data.as_instanceof_cause() if isinstance(data, ray.exceptions.RayTaskError) else data
                failures += 1
                left = [i for i in lost.indices if i not in results]
                log.warning("a Ray worker died with %d games unfinished; playing them elsewhere", len(left))
                if failures > MAX_WORKER_FAILURES * len(self.actors):
                    raise DistributedError(f"Ray workers died {failures} times in one call; giving up") from data
                if left:
                    todo.appendleft(left)
                    self.replayed += len(left)
                replacement = self._cls.remote()
                self.actors[self.actors.index(lost.actor)] = replacement
                self.replaced += 1
                idle.append(replacement)
        return [results[i] for i in range(len(matches))]
