"""How human-like a human proxy is, on human games it never saw (``parlay proxy check``).

Carroll et al. (2019) validate a behaviour-cloned human model on held-out human data before
using it as a stand-in for people; Lewis et al. (2017) report their supervised model's
perplexity on held-out dialogues. On held human games this gives, beside each other:

- **next-message likelihood**: the mean log-likelihood per token (nats) of the people's turns
  (the imitated sides' accepted messages and proposals, each with its end-of-turn token) given
  the game so far, under the proxy and under its base model without the training, pooled over
  tokens and averaged per turn; tokenised and masked as the trainer does (``sft.turn_logps``);
- **play**: the proxy with itself on the held games' contexts, first speakers and objectives:
  its agreement rate and mean reward per player beside the people's own on the same games;
- **the selection step**: the proxy plays as ``proxy:DIR`` does, with the step its manifest
  names (``ProxyManifest.select``), unless told otherwise; the check records which, and one
  played with the other setting is filed apart (``ProxyDir.check_stem``) and never refuses it;
- **protocol acceptance**: the share of the proxy's replies in those games that the protocol
  accepted (rejected attempts count as replies);
- **closing the people's deals**: on each held game the people agreed in, the proxy carries on
  from the people's own messages (``GameSpec.opening``: every accepted message before their
  selections) with itself, for at most ``CLOSE_MESSAGES`` more messages: the share of those games
  it brings to a deal, and the share whose deal is the people's split. The people's talk has
  already settled what to do there, so this isolates turning an agreed dialogue into the two
  proposals that must divide the items exactly (the selections of Lewis et al., hidden from each
  other) from reaching an agreement at all.

The result is written to the proxy's ``check.json``, its games with itself to ``check_games.jsonl``
and those carried on from the people's messages to ``check_closing.jsonl`` (with the other
proposal setting: ``check_sampled*`` or ``check_selected*``); a
proxy whose replies are rejected on most turns (acceptance below ``proxy.MIN_ACCEPTED``) is then
refused as a partner (``ProxyDir.playable``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from parlay.agents import load_agent
from parlay.agents.base import Agent, Sampling
from parlay.config import TrainConfig
from parlay.episode import Episode, write_episodes
from parlay.errors import UserError
from parlay.games.dond import DEFAULT_MAX_MESSAGES, objective
from parlay.improve.proxy import human_examples, read_human_games
from parlay.proxy import ProxyCheck, ProxyDir, file_sha256
from parlay.rollout import GameSpec, derive_seed, play_games
from parlay.specs import model_spec


def held_games(episodes: list[Episode], seed: int) -> list[GameSpec]:
    """The held games as games to play: each one's context and first speaker, a seed per game."""
    return [
        GameSpec(id=f"check-{i:05d}-{ep.id}", context=ep.game_context(), first_speaker=ep.first_speaker,
                 seed=derive_seed(seed, i))
        for i, ep in enumerate(episodes)
    ]  # fmt: skip


def mean_reward(episodes: list[Episode]) -> float:
    """Mean reward per player over games (a game without a deal counts as 0)."""
    return sum(sum(ep.rewards) / 2 for ep in episodes) / len(episodes)


CLOSE_MESSAGES = 4
"""Messages the proxy may add to the people's own before their deal counts as not closed."""


def opening(episode: Episode) -> tuple[str, ...]:
    """The replies of ``episode``'s accepted messages before its first proposal, as sent."""
    out = []
    for turn in episode.turns:
        if not turn.accepted:
            continue
        if turn.kind != "message":
            break
        out.append(turn.text)
    return tuple(out)


def play_itself(
    agent: Agent, episodes: list[Episode], games: list[GameSpec], max_messages: int | None
) -> list[Episode]:
    """``agent`` with itself on ``games`` (one per episode, in order), each under its episode's
    objective; the episodes played, in order."""
    by_objective: dict[float, list[int]] = {}
    for i, ep in enumerate(episodes):
        by_objective.setdefault(ep.objective["lam"], []).append(i)
    played: dict[int, Episode] = {}
    for lam, idx in by_objective.items():
        out = play_games(agent, agent, [games[i] for i in idx], objective(lam), max_messages)
        played |= dict(zip(idx, out, strict=True))
    return [played[i] for i in range(len(episodes))]


def closing_games(episodes: list[Episode], seed: int) -> tuple[list[Episode], list[GameSpec]]:
    """The held games the people agreed in, each as a game opening with their messages."""
    agreed = [ep for ep in episodes if ep.agreed]
    games = [
        GameSpec(id=f"close-{i:05d}-{ep.id}", context=ep.game_context(), first_speaker=ep.first_speaker,
                 seed=derive_seed(seed, 1, i), opening=opening(ep))
        for i, ep in enumerate(agreed)
    ]  # fmt: skip
    return agreed, games


def same_split(played: Episode, people: Episode) -> bool:
    """Whether ``played`` ended in the deal ``people`` made (each seat keeping what it kept)."""
    return played.agreed and played.outcome.proposals == people.outcome.proposals


def acceptance(played: list[Episode]) -> tuple[int, int]:
    """(replies, of which accepted) over every turn of ``played`` (both seats: the proxy)."""
    attempts = sum(len(ep.turns) for ep in played)
    return attempts, sum(t.accepted for ep in played for t in ep.turns)


def check_proxy(
    proxy_path: str | Path,
    episodes_path: str | Path,
    *,
    sampling: Sampling | None = None,
    max_messages: int | None = DEFAULT_MAX_MESSAGES,
    games: int | None = None,
    seed: int = 0,
    train: TrainConfig | None = None,
    select: bool | None = None,
    load: Callable[..., Agent] = load_agent,
) -> ProxyCheck:
    """Check the proxy in ``proxy_path`` on the human games of ``episodes_path`` (the first
    ``games`` of them, default all) and write it (``ProxyDir.write_check``). ``train``: batch size, dtype
    and cut length of the likelihood pass (default ``TrainConfig()``). ``select``: play with the
    selection step or without (default: as the manifest says, as ``proxy:DIR`` plays). ``UserError`` before
    anything is scored or played: not a proxy, the file it was trained on, an unreadable or empty
    file, no agreed game or no turn of the imitated sides."""
    from parlay.improve.sft import turn_logps

    proxy = ProxyDir(proxy_path)
    manifest = proxy.manifest()
    model = proxy.model_ref()
    digest = file_sha256(episodes_path)
    if digest == manifest.episodes_sha256:
        raise UserError(
            f"{episodes_path}: the proxy in {proxy.path} was trained on this very file; check it on "
            "human games it never saw (import another split, e.g. Lewis et al.'s val.txt or test.txt)"
        )
    episodes = read_human_games(episodes_path)[:games]
    examples = human_examples(episodes_path, episodes, manifest.sides, "all").examples
    cfg = train or TrainConfig()

    under_proxy = turn_logps(examples, model.base, model.adapter, cfg)
    under_base = turn_logps(examples, manifest.base, None, cfg)

    select = manifest.select if select is None else select
    spec = model_spec(model.base, model.adapter, "auto", 64, "hf", select=select)
    agent = load(spec, sampling or Sampling(seed=seed))
    agent.spec = f"proxy:{proxy_path}"
    agreed, closing = closing_games(episodes, seed)
    try:
        played = play_itself(agent, episodes, held_games(episodes, seed), max_messages)
        closed = play_itself(agent, agreed, closing, CLOSE_MESSAGES)
    finally:
        agent.close()
    stem = proxy.check_stem(select)
    write_episodes(proxy.path / f"{stem}_games.jsonl", played)
    write_episodes(proxy.path / f"{stem}_closing.jsonl", closed)
    attempts, accepted = acceptance(played)
    tokens = [t for ex in under_proxy for t in ex]
    check = ProxyCheck(
        episodes=str(episodes_path),
        episodes_sha256=digest,
        games=len(episodes),
        sides=manifest.sides,
        human_turns=len(tokens),
        human_tokens=sum(len(t) for t in tokens),
        loglik_proxy=_per_token(under_proxy),
        loglik_base=_per_token(under_base),
        loglik_turn_proxy=_per_turn(under_proxy),
        loglik_turn_base=_per_turn(under_base),
        human_agreement=sum(ep.agreed for ep in episodes) / len(episodes),
        human_reward=mean_reward(episodes),
        proxy_games=len(played),
        proxy_agreement=sum(ep.agreed for ep in played) / len(played),
        proxy_reward=mean_reward(played),
        attempts=attempts,
        accepted=accepted,
        acceptance=accepted / attempts if attempts else 0.0,
        max_messages=max_messages,
        seed=seed,
        close_games=len(closed),
        close_agreement=sum(ep.agreed for ep in closed) / len(closed),
        close_same_split=sum(same_split(p, h) for p, h in zip(closed, agreed, strict=True)) / len(closed),
        close_messages=CLOSE_MESSAGES,
        select=select,
    )
    proxy.write_check(check)
    return check


def _per_token(logps: list[list[list[float]]]) -> float:
    flat = [x for ex in logps for turn in ex for x in turn]
    return sum(flat) / len(flat) if flat else math.nan


def _per_turn(logps: list[list[list[float]]]) -> float:
    turns = [sum(turn) / len(turn) for ex in logps for turn in ex if turn]
    return sum(turns) / len(turns) if turns else math.nan
