"""What a round learns from: the one path from games to weighted training examples.

``select_examples`` is used by the warm start, by every round and by ``parlay export``, so what
is exported is what a round trains on. Over the player-episodes of one set of games (one round)
that belong to the model being trained (``learner_sides``: both sides of self-play, the model's
side of a game with another partner):

1. the filter rule (``filters.select``: above the mean, nonzero, agreed, …, with its fallback);
2. sides with turns of their own — an aborted game's silent side has nothing to imitate;
3. the judge gate, when a judge's ratings filter (``weights.judge.mode: filter``);
4. the weights (``weights.static_weights``: uniform, AWR, judge; iw-SFT starts at 1 and the
   trainer rescales each example as it trains; online RL's advantages, ``weights.rl_advantages``,
   negative for sides that did worse than their baseline);
5. examples whose weight is zero are dropped.

Each example also carries the sampler's log-probs of its assistant turns where the agent reported
them (``sampled_logprobs``), for the trainer's sampler–trainer parity check.

The examples are written as ``train.jsonl`` (``write_examples``), one ``TrainExample`` a line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ValidationError

from parlay.config import FilterConfig, WeightConfig
from parlay.episode import Episode, PlayerEpisode, player_episodes, write_lines_atomic
from parlay.improve import TrainDataError
from parlay.improve.filters import select
from parlay.improve.judge import correlation
from parlay.improve.weights import rl_advantages, static_weights
from parlay.protocol import ChatMessage
from parlay.run import SelectionInfo


class TrainExample(BaseModel):
    """One kept player-episode as the trainer reads it (a line of ``train.jsonl``)."""

    messages: list[ChatMessage]
    weight: float = 1.0
    reward: float = 0.0
    episode_id: str = ""
    player: str = ""
    rating: float | None = None
    """The judge's 0-10 rating, when a judge rated it."""
    sampled_logprobs: list[list[float] | None] | None = None
    """The sampler's log-prob of each token of each assistant message, in order (``Turn.logprobs``:
    stop token excluded, temperature 1); a message's entry is None where it is not the reply as
    sampled (``sampled_logprobs``). None when no turn carried any. The trainer compares its own
    with them before it starts (``sft.sampler_parity``)."""


@dataclass(frozen=True)
class Selected:
    examples: list[TrainExample]
    sides: list[PlayerEpisode]
    """The player-episode each example comes from, in the same order."""
    info: SelectionInfo


def _learner_sides(episodes: Sequence[Episode]) -> list[tuple[PlayerEpisode, Episode]]:
    return [(s, ep) for ep in episodes for s in player_episodes(ep) if s.player in s.meta.get("learner", "AB")]


def learner_sides(episodes: Sequence[Episode]) -> list[PlayerEpisode]:
    """The player-episodes of the model being trained, in order: the seats ``meta["learner"]``
    names (both when it is absent: self-play, bot demonstrations)."""
    return [s for s, _ in _learner_sides(episodes)]


def sampled_logprobs(episode: Episode, player: str) -> list[list[float] | None] | None:
    """The sampler's log-probs (``Turn.logprobs``) of each assistant message of ``player``'s
    transcript, in order: its accepted turns, one each. A message's entry is None where the
    comparison would not be like for like: the agent reported none; the reply as sampled
    (``Turn.text``, stripped) is not the message it became (the game writes replies in canonical
    form); or it followed a rejected attempt of the same player, whose prompt held that attempt and
    its feedback, which the transcript leaves out. None when no entry is left (or when the turns and
    the transcript do not pair up: a game not recorded by ``Game``)."""
    own = [m["content"] for m in episode.transcripts[player] if m["role"] == "assistant"]
    turns = [(i, t) for i, t in enumerate(episode.turns) if t.player == player and t.accepted]
    if len(turns) != len(own):
        return None
    out: list[list[float] | None] = []
    for (i, turn), content in zip(turns, own, strict=True):
        retried = i > 0 and not episode.turns[i - 1].accepted and episode.turns[i - 1].player == player
        same = turn.logprobs is not None and turn.text.strip() == content and not retried
        out.append(list(turn.logprobs) if same else None)  # type: ignore[arg-type]
    return out if any(lp is not None for lp in out) else None


def has_own_turns(side: PlayerEpisode) -> bool:
    return any(m["role"] == "assistant" for m in side.messages)


def select_examples(
    episodes: Sequence[Episode],
    rule: FilterConfig,
    weights: WeightConfig,
    ratings: Sequence[float | None] | None = None,
) -> Selected:
    """The training examples of one set of games (see the module docstring). ``ratings``: a
    judge's rating of every learner side (``learner_sides``), in order, when ``weights.scheme``
    is ``judge``."""
    pairs = _learner_sides(episodes)
    sides = [s for s, _ in pairs]
    if weights.scheme == "judge" and (ratings is None or len(ratings) != len(sides)):
        raise TrainDataError("weights.scheme judge needs a judge's rating of every player-episode")
    selection = select(sides, rule)  # 1
    kept = [i for i in selection.kept if has_own_turns(sides[i])]  # 2
    if ratings is not None and weights.judge.mode == "filter":  # 3
        kept = [i for i in kept if (ratings[i] or 0) >= weights.judge.min_rating]
    if weights.scheme == "rl":  # 4: advantages, negative ones included
        w = rl_advantages([sides[i] for i in kept], weights.rl)
    else:
        w = static_weights(
            weights,
            [sides[i].reward for i in kept],
            [selection.baselines[i] for i in kept],
            [ratings[i] for i in kept] if ratings is not None else None,
        )
    chosen = [(i, wi) for i, wi in zip(kept, w, strict=True) if wi != 0]  # 5
    examples = [
        TrainExample(
            messages=sides[i].messages,
            weight=wi,
            reward=sides[i].reward,
            episode_id=sides[i].episode_id,
            player=sides[i].player,
            rating=ratings[i] if ratings is not None else None,
            sampled_logprobs=sampled_logprobs(pairs[i][1], sides[i].player),
        )
        for i, wi in chosen
    ]
    info = SelectionInfo(
        player_episodes=len(sides),
        rule=selection.rule,
        passed_filter=len(selection.kept),
        kept=len(examples),
        note=selection.note,
        judge=correlation(ratings, [s.reward for s in sides]) if ratings is not None else None,
    )
    return Selected(examples, [sides[i] for i, _ in chosen], info)


def write_examples(path: str | Path, examples: Sequence[TrainExample]) -> None:
    write_lines_atomic(path, (e.model_dump_json() for e in examples))


def read_examples(path: str | Path) -> list[TrainExample]:
    path = Path(path)
    out = []
    try:
        f = path.open(encoding="utf-8")
    except OSError as exc:
        raise TrainDataError(f"{path}: cannot read training examples: {exc.strerror or exc}") from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(TrainExample.model_validate_json(line))
            except ValidationError as exc:
                raise TrainDataError(f"{path}:{n}: not a training example: {exc.errors()[0]['msg']}") from None
    return out
