"""Episodes: the record of one game, its JSONL files, and the player-episodes training uses.

An ``Episode`` holds everything needed to analyse or learn from a game: the context, the
objective, who spoke first, every turn including rejected attempts (with the reason and the
feedback given), the outcome, raw scores and rewards, and each player's chat transcript with
accepted turns only. ``SCHEMA_VERSION`` is written into every line.

Files are JSON Lines. ``EpisodeWriter`` appends one complete line per finished game and flushes
it, repairing a torn last line left by a kill before it appends; ``write_episodes`` replaces a
file atomically (temp file + rename). ``read_episodes`` rejects a corrupt line by number and
reports — not fails on — a truncated last line.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from parlay.files import write_lines_atomic  # its home; `from parlay.episode import` it still works
from parlay.games.dond import Context, Objective, objective
from parlay.protocol import ChatMessage, Game, Outcome, Turn

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


class EpisodeFileError(ValueError):
    """An episodes file that cannot be read; the message names the file and line."""


class Episode(BaseModel):
    schema_version: int = SCHEMA_VERSION
    id: str
    context: dict[str, list[int]]
    """``{"counts": [...], "values_a": [...], "values_b": [...]}``"""
    objective: dict[str, Any]
    """``{"name": ..., "lam": ...}``"""
    first_speaker: Literal["A", "B"]
    max_messages: int | None
    turns: list[Turn]
    outcome: Outcome
    raw_scores: list[int]
    rewards: list[float]
    transcripts: dict[str, list[ChatMessage]]
    """Per player: system prompt, partner turns as ``user``, own accepted turns as ``assistant``."""
    meta: dict[str, Any] = Field(default_factory=dict)
    """Who played (agent specs), seeds, source file, round…"""

    @classmethod
    def from_game(cls, game: Game, id: str, meta: dict[str, Any] | None = None) -> Episode:
        if game.outcome is None:
            raise ValueError("cannot record an unfinished game")
        return cls(
            id=id,
            context=game.context.to_dict(),
            objective=game.objective.to_dict(),
            first_speaker=game.first_speaker,  # type: ignore[arg-type]
            max_messages=game.max_messages,
            turns=game.turns,
            outcome=game.outcome,
            raw_scores=list(game.raw_scores),
            rewards=list(game.rewards),
            transcripts={p: list(t) for p, t in game.transcripts.items()},
            meta=meta or {},
        )

    def game_context(self) -> Context:
        return Context.from_dict(self.context)

    @property
    def agreed(self) -> bool:
        return self.outcome.agreed

    def game_objective(self) -> Objective:
        return objective(self.objective["lam"])

    def message_turns(self) -> list[tuple[int, Turn]]:
        """The accepted messages (not proposals), with their index among all turns."""
        return [(i, t) for i, t in enumerate(self.turns) if t.accepted and t.kind == "message" and t.message]

    def messages(self) -> list[str]:
        return [t.message or "" for _, t in self.message_turns()]


@dataclass
class PlayerEpisode:
    """One player's side of one game, as training sees it."""

    episode_id: str
    player: str
    messages: list[ChatMessage]
    reward: float
    raw_score: int
    agreed: bool
    context_key: str
    """Identifies the context (same counts and values → same key), for per-context baselines."""
    first: bool = False
    """This side spoke first (its role)."""
    meta: dict[str, Any] = field(default_factory=dict)


def player_episodes(episode: Episode) -> list[PlayerEpisode]:
    """Both sides of a game as training examples; transcripts hold accepted turns only."""
    key = json.dumps(episode.context, sort_keys=True)
    out = []
    for i, player in enumerate(("A", "B")):
        out.append(
            PlayerEpisode(
                episode_id=episode.id,
                player=player,
                messages=[dict(m) for m in episode.transcripts[player]],
                reward=episode.rewards[i],
                raw_score=episode.raw_scores[i],
                agreed=episode.agreed,
                context_key=key,
                first=episode.first_speaker == player,
                meta=dict(episode.meta),
            )
        )
    return out


def all_player_episodes(episodes: Iterable[Episode]) -> list[PlayerEpisode]:
    """Both sides of every game, in order: A then B of the first game, and so on."""
    return [pe for ep in episodes for pe in player_episodes(ep)]


# --------------------------------------------------------------------------- files


@dataclass
class ReadReport:
    """What ``read_episodes`` found besides the episodes."""

    truncated_tail: bool = False
    """The last line was cut short (a writer killed mid-line); it was skipped."""


def first_problem(exc: ValidationError) -> str:
    """A record's first validation error in words: ``field 'outcome.status': Input should be …``."""
    first = exc.errors()[0]
    return f"field '{'.'.join(str(p) for p in first['loc'])}': {first['msg']}"


def _parse_line(line: str, path: Path, lineno: int) -> Episode:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise EpisodeFileError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(data, dict):
        raise EpisodeFileError(f"{path}:{lineno}: expected a JSON object, got {type(data).__name__}")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise EpisodeFileError(
            f"{path}:{lineno}: episode schema version {version!r}; this parlay reads version {SCHEMA_VERSION}"
        )
    try:
        return Episode.model_validate(data)
    except ValidationError as exc:
        raise EpisodeFileError(f"{path}:{lineno}: {first_problem(exc)}") from None


def iter_episodes(path: str | Path, report: ReadReport | None = None) -> Iterator[Episode]:
    """Episodes of a JSONL file, one by one. A torn last line is skipped and reported."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise EpisodeFileError(f"{path}: cannot read episodes file: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EpisodeFileError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    lines = text.split("\n")
    complete, tail = lines[:-1], lines[-1]
    for lineno, line in enumerate(complete, start=1):
        if line.strip():
            yield _parse_line(line, path, lineno)
    if tail.strip():
        try:
            yield _parse_line(tail, path, len(complete) + 1)
        except EpisodeFileError:
            log.warning("%s:%d: last line is truncated (interrupted write); skipped", path, len(complete) + 1)
            if report is not None:
                report.truncated_tail = True


def read_episodes(path: str | Path, report: ReadReport | None = None) -> list[Episode]:
    return list(iter_episodes(path, report))


def write_episodes(path: str | Path, episodes: Iterable[Episode]) -> None:
    """Replace ``path`` with these episodes atomically."""
    write_lines_atomic(path, (ep.model_dump_json() for ep in episodes))


def _repair_tail(path: Path) -> None:
    """Cut a torn last line (no trailing newline) off an append-only file."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        data = f.seek(0) or f.read()
        keep = data.rfind(b"\n") + 1
        log.warning("%s: dropping a torn last line (%d bytes) left by an interrupted write", path, len(data) - keep)
        f.truncate(keep)


class EpisodeWriter:
    """Append-only JSONL writer: each episode is one line, written and flushed at once."""

    def __init__(self, path: str | Path, append: bool = False) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise EpisodeFileError(
                f"{self.path}: is a folder; give the path of an episodes file, e.g. {self.path}/eps.jsonl"
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if append:
                _repair_tail(self.path)
            self._file = self.path.open("a" if append else "w", encoding="utf-8")
        except OSError as exc:
            raise EpisodeFileError(f"{self.path}: cannot write episodes here: {exc.strerror or exc}") from None
        self.count = 0

    def write(self, episode: Episode) -> None:
        self._file.write(episode.model_dump_json() + "\n")
        self._file.flush()
        self.count += 1

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> EpisodeWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
