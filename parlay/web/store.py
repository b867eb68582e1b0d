"""Storage of a study: participants, games and every accepted move, through SQLAlchemy.

SQLite (in WAL mode, so readers never wait for the writer) is the default; any SQLAlchemy URL
works (``postgresql+psycopg://…`` is tested against a real server). What is stored is the
*input* of the game core, not its state: a game row holds its seeded context and first speaker,
and the ``moves`` table every reply the referee accepted, numbered. Replaying the moves through
``protocol.Game`` rebuilds a live game exactly, so a server restarted mid-game goes on where it
was; a finished game also keeps its ``Episode`` (the self-play schema) for export.

A move is written (and committed) before it is applied in memory or acknowledged to anyone;
the primary key (game, seq) makes a second writer of the same turn fail instead of forking the
game, and (game, move id) makes a double-submitted browser move land once. Tokens are stored
only as SHA-256 hashes: they are long random strings, so a hash is enough and a leaked database
gives no way in.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from parlay.config import ConfigError
from parlay.web.study import Study

TOKEN_BYTES = 32


def new_token() -> str:
    """A participant or admin token: 43 URL-safe characters from 32 random bytes."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class StudyRow(Base):
    __tablename__ = "studies"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(32))
    definition: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_now)


class ParticipantRow(Base):
    __tablename__ = "participants"
    __table_args__ = (UniqueConstraint("study", "number"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study: Mapped[str] = mapped_column(ForeignKey("studies.name"))
    number: Mapped[int] = mapped_column(Integer)
    """0, 1, 2… in the order tokens were made; it decides the conditions (``Study.conditions_of``)."""
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_now)
    consented_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    checked_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    check_attempts: Mapped[int] = mapped_column(Integer, default=0)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class GameRow(Base):
    __tablename__ = "games"
    __table_args__ = (UniqueConstraint("participant_id", "number"),)
    id: Mapped[str] = mapped_column(String(96), primary_key=True)
    participant_id: Mapped[int] = mapped_column(ForeignKey("participants.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    condition: Mapped[int] = mapped_column(Integer)
    agent: Mapped[str] = mapped_column(Text)
    lam: Mapped[float] = mapped_column(Float)
    context: Mapped[dict[str, Any]] = mapped_column(JSON)
    first_speaker: Mapped[str] = mapped_column(String(1))
    seed: Mapped[int] = mapped_column(BigInteger)
    max_messages: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(8), default="live", index=True)
    """live or done."""
    ended: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    """An end from outside the referee (a backend failure): {"status": …, "reason": …}."""
    episode: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_now)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_now)


class MoveRow(Base):
    __tablename__ = "moves"
    __table_args__ = (UniqueConstraint("game_id", "move_id"),)
    game_id: Mapped[str] = mapped_column(ForeignKey("games.id"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    """The index of this turn among the game's turns (``len(game.turns)`` before it)."""
    player: Mapped[str] = mapped_column(String(1))
    text: Mapped[str] = mapped_column(Text)
    tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    move_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """The browser's id of a person's move (None for a model's)."""
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_now)


class MoveConflict(RuntimeError):
    """Another writer stored this turn first (two servers on one database)."""


class Store:
    """The study database. Methods are synchronous and each is one transaction; the app calls
    them from worker threads."""

    def __init__(self, url: str) -> None:
        self.url = url
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        try:
            self.engine = create_engine(url, **kwargs)
        except Exception as exc:  # a malformed URL or a missing driver
            raise ConfigError(f"database {url!r}: {exc}") from None
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        try:
            Base.metadata.create_all(self.engine)
        except Exception as exc:
            raise ConfigError(f"database {url!r} cannot be opened: {exc}") from None
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._session() as s, s.begin():
            yield s

    def close(self) -> None:
        self.engine.dispose()

    # -- studies and participants

    def ensure_study(self, study: Study) -> None:
        """Register the study, or check that the one stored under its name is the same."""
        with self.session() as s:
            row = s.get(StudyRow, study.name)
            if row is None:
                s.add(StudyRow(name=study.name, fingerprint=study.fingerprint(), definition=study.model_dump()))
            elif row.fingerprint != study.fingerprint():
                raise ConfigError(
                    f"the database already holds a different study named {study.name!r}; its participants were "
                    "assigned under that definition. Give this study another name, or use another database."
                )

    def add_participants(self, study: Study, n: int) -> list[tuple[int, str]]:
        """Make ``n`` participants; returns (number, token) pairs. Only the hashes are kept: the
        tokens cannot be shown again."""
        self.ensure_study(study)
        with self.session() as s:
            start = s.scalar(
                select(func.coalesce(func.max(ParticipantRow.number) + 1, 0)).where(ParticipantRow.study == study.name)
            )
            made = [(start + i, new_token()) for i in range(n)]
            s.add_all(ParticipantRow(study=study.name, number=k, token_hash=token_hash(t)) for k, t in made)
        return made

    def participant(self, token: str) -> ParticipantRow | None:
        with self.session() as s:
            return s.scalar(select(ParticipantRow).where(ParticipantRow.token_hash == token_hash(token)))

    def participant_by_id(self, participant_id: int) -> ParticipantRow | None:
        with self.session() as s:
            return s.get(ParticipantRow, participant_id)

    def participants(self, study: str) -> list[ParticipantRow]:
        with self.session() as s:
            return list(s.scalars(select(ParticipantRow).where(ParticipantRow.study == study).order_by("number")))

    def mark(self, participant_id: int, field: str, attempts: int = 0) -> ParticipantRow:
        """Set ``consented_at``, ``checked_at`` or ``finished_at`` (once); count check attempts."""
        with self.session() as s:
            row = s.get_one(ParticipantRow, participant_id)
            row.check_attempts += attempts
            if field and getattr(row, field) is None:
                setattr(row, field, _now())
            return row

    # -- games and moves

    def create_game(self, row: GameRow) -> GameRow:
        with self.session() as s:
            s.add(row)
        return row

    def game(self, game_id: str) -> GameRow | None:
        with self.session() as s:
            return s.get(GameRow, game_id)

    def games_of(self, participant_id: int) -> list[GameRow]:
        with self.session() as s:
            query = select(GameRow).where(GameRow.participant_id == participant_id).order_by(GameRow.number)
            return list(s.scalars(query))

    def games(self, study: str | None = None, status: str | None = None) -> list[GameRow]:
        with self.session() as s:
            query = select(GameRow).join(ParticipantRow).order_by(ParticipantRow.number, GameRow.number)
            if study is not None:
                query = query.where(ParticipantRow.study == study)
            if status is not None:
                query = query.where(GameRow.status == status)
            return list(s.scalars(query))

    def moves(self, game_id: str) -> list[MoveRow]:
        with self.session() as s:
            return list(s.scalars(select(MoveRow).where(MoveRow.game_id == game_id).order_by(MoveRow.seq)))

    def add_move(self, game_id: str, seq: int, player: str, text: str, tokens: int | None, move_id: str | None) -> None:
        try:
            with self.session() as s:
                s.add(MoveRow(game_id=game_id, seq=seq, player=player, text=text, tokens=tokens, move_id=move_id))
                s.get_one(GameRow, game_id).updated_at = _now()
        except IntegrityError:
            raise MoveConflict(f"turn {seq} of game {game_id} was already stored") from None

    def end_game(self, game_id: str, episode: dict[str, Any] | None, ended: dict[str, Any] | None = None) -> None:
        """Record an outside end (``ended``) and/or the finished game's episode."""
        with self.session() as s:
            row = s.get_one(GameRow, game_id)
            if ended is not None:
                row.ended = ended
            if episode is not None:
                row.status, row.episode = "done", episode
            row.updated_at = _now()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
