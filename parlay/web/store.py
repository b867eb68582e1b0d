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

Every change is one transaction (a move and, when it ends the game, the game's end and episode
together), retried a few times when the database is busy and otherwise reported as
``StoreUnavailable`` (nothing of it applied). ``check_writable`` refuses a database that cannot be
written before anything is served, and a SQLite file deleted or replaced under a running server
is noticed before the next transaction (``StoreUnavailable`` from then on): nothing is ever
acknowledged into a file that is gone. What happens to a study outside its moves (a server start,
a corrected study, a game abandoned or ended by the admin) is kept in ``events``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

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
    inspect,
    select,
    text,
)
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from parlay.config import ConfigError
from parlay.web.study import Study

log = logging.getLogger(__name__)

TOKEN_BYTES = 32
WRITE_ATTEMPTS = 3
"""Tries of one transaction when the database is busy or fails (0.05 s, then 0.25 s apart)."""
T = TypeVar("T")


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
    ended_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    """Set when the admin ended the participant's part (they play no more games)."""


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
    """An end from outside the referee: {"status": "failed" | "abandoned", "reason": …} (a backend
    failure; a person who left, after the study's timeout or by the admin's hand)."""
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


class EventRow(Base):
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    kind: Mapped[str] = mapped_column(String(32))
    """serve, study_corrected, game_abandoned, game_ended, participant_ended."""
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=_now)


class MoveConflict(RuntimeError):
    """Another writer stored this turn first (two servers on one database)."""


class StoreUnavailable(RuntimeError):
    """The database could not take a transaction (after retries), or its file was deleted or
    replaced under the server; nothing of the transaction was applied."""


class Store:
    """The study database. Methods are synchronous and each is one transaction; the app calls
    them from worker threads."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.fault: Callable[[str], None] | None = None
        """Called with a transaction's name before each try of it: tests and ``bench/serve.py``
        raise from it to inject storage faults."""
        self.broken: str | None = None
        """Why the store stopped taking transactions (its file went away), or None."""
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
            _add_missing_columns(self.engine)
        except Exception as exc:
            raise ConfigError(f"database {url!r} cannot be opened: {_why(exc)}") from None
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        self._file = _sqlite_file(self.engine)
        self._identity = _identity(self._file) if self._file else None

    @contextmanager
    def session(self) -> Iterator[Session]:
        self._check_file()
        with self._session() as s, s.begin():
            yield s

    def write(self, name: str, change: Callable[[Session], T]) -> T:
        """Run ``change`` in one transaction, tried up to ``WRITE_ATTEMPTS`` times when the
        database fails (busy, an I/O error); ``StoreUnavailable`` when every try failed.
        ``IntegrityError`` (a conflict, not a fault) is raised at once."""
        for attempt in range(WRITE_ATTEMPTS):
            try:
                if self.fault is not None:
                    self.fault(name)
                with self.session() as s:
                    return change(s)
            except (IntegrityError, StoreUnavailable):
                raise
            except (OperationalError, SQLAlchemyError, OSError) as exc:
                log.warning("database write %s failed (try %d of %d): %s", name, attempt + 1, WRITE_ATTEMPTS, _why(exc))
                if attempt + 1 == WRITE_ATTEMPTS:
                    raise StoreUnavailable(f"the study database could not record this ({_why(exc)})") from exc
                time.sleep(0.05 * 5**attempt)
        raise AssertionError("unreachable")

    def _check_file(self) -> None:
        if self.broken is None and self._file is not None and _identity(self._file) != self._identity:
            self.broken = (
                f"the database file {self._file} was deleted or replaced while the server was running; nothing "
                "more is recorded: stop the server, put the file back (or start on a new database) and restart"
            )
            log.error("%s", self.broken)
        if self.broken is not None:
            raise StoreUnavailable(self.broken)

    def check_writable(self, study: str | None = None) -> None:
        """Write (and keep) a ``serve`` event: a database that cannot be written is refused with
        one line naming its URL and the reason, before anything is served."""
        try:
            self.write("serve", lambda s: s.add(EventRow(study=study, kind="serve", detail={"pid": os.getpid()})))
        except (StoreUnavailable, SQLAlchemyError) as exc:
            cause = exc.__cause__ or exc
            raise ConfigError(f"database {self.url!r} cannot be written: {_why(cause)}") from None

    def close(self) -> None:
        self.engine.dispose()

    def record(self, study: str | None, kind: str, **detail: Any) -> None:
        """Keep an event of the study (see ``EventRow``)."""
        self.write(kind, lambda s: s.add(EventRow(study=study, kind=kind, detail=detail)))

    def events(self, study: str | None = None, kind: str | None = None) -> list[EventRow]:
        with self.session() as s:
            query = select(EventRow).order_by(EventRow.id)
            if study is not None:
                query = query.where(EventRow.study == study)
            if kind is not None:
                query = query.where(EventRow.kind == kind)
            return list(s.scalars(query))

    # -- studies and participants

    def ensure_study(self, study: Study) -> None:
        """Register the study, or check that the one stored under its name is the same. A stored
        study that no participant has started (none consented) may be corrected: the new
        definition replaces it and the change is kept as a ``study_corrected`` event. Once anyone
        has started, a different definition is refused (participants were assigned under it)."""

        def ensure(s: Session) -> None:
            row = s.get(StudyRow, study.name)
            if row is None:
                s.add(StudyRow(name=study.name, fingerprint=study.fingerprint(), definition=study.model_dump()))
                return
            if row.fingerprint == study.fingerprint():
                return
            started = s.scalar(
                select(func.count())
                .select_from(ParticipantRow)
                .where(ParticipantRow.study == study.name, ParticipantRow.consented_at.is_not(None))
            )
            if started:
                raise ConfigError(
                    f"the database already holds a different study named {study.name!r}, and {started} "
                    "participant(s) have started under that definition. Give this study another name, or use "
                    "another database."
                )
            s.add(
                EventRow(
                    study=study.name,
                    kind="study_corrected",
                    detail={"before": row.definition, "after": study.model_dump(), "was": row.fingerprint},
                )
            )
            row.fingerprint, row.definition = study.fingerprint(), study.model_dump()
            log.warning("study %r corrected before any participant started (kept in events)", study.name)

        self.write("ensure_study", ensure)

    def add_participants(self, study: Study, n: int) -> list[tuple[int, str]]:
        """Make ``n`` participants; returns (number, token) pairs. Only the hashes are kept: the
        tokens cannot be shown again."""
        self.ensure_study(study)

        def add(s: Session) -> list[tuple[int, str]]:
            start = s.scalar(
                select(func.coalesce(func.max(ParticipantRow.number) + 1, 0)).where(ParticipantRow.study == study.name)
            )
            made = [(start + i, new_token()) for i in range(n)]
            s.add_all(ParticipantRow(study=study.name, number=k, token_hash=token_hash(t)) for k, t in made)
            return made

        return self.write("add_participants", add)

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
        """Set ``consented_at``, ``checked_at``, ``finished_at`` or ``ended_at`` (once); count check attempts."""

        def mark(s: Session) -> ParticipantRow:
            row = s.get_one(ParticipantRow, participant_id)
            row.check_attempts += attempts
            if field and getattr(row, field) is None:
                setattr(row, field, _now())
            return row

        return self.write("mark", mark)

    # -- games and moves

    def create_game(self, row: GameRow) -> GameRow:
        self.write("create_game", lambda s: s.add(row))
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

    def move_counts(self, study: str) -> dict[str, int]:
        """Stored moves per game of the study (live games included)."""
        with self.session() as s:
            query = (
                select(MoveRow.game_id, func.count())
                .join(GameRow, GameRow.id == MoveRow.game_id)
                .join(ParticipantRow, ParticipantRow.id == GameRow.participant_id)
                .where(ParticipantRow.study == study)
                .group_by(MoveRow.game_id)
            )
            return {game_id: n for game_id, n in s.execute(query)}

    def add_move(
        self,
        game_id: str,
        seq: int,
        player: str,
        text: str,
        tokens: int | None,
        move_id: str | None,
        episode: dict[str, Any] | None = None,
    ) -> None:
        """Store a move and, when it ended the game, the game's episode, in one transaction."""

        def add(s: Session) -> None:
            s.add(MoveRow(game_id=game_id, seq=seq, player=player, text=text, tokens=tokens, move_id=move_id))
            s.flush()  # a second writer of this turn fails here, before the game is touched
            row = s.get_one(GameRow, game_id)
            row.updated_at = _now()
            if episode is not None:
                row.status, row.episode = "done", episode

        try:
            self.write("add_move", add)
        except IntegrityError:
            raise MoveConflict(f"turn {seq} of game {game_id} was already stored") from None

    def end_game(self, game_id: str, episode: dict[str, Any] | None, ended: dict[str, Any] | None = None) -> None:
        """Record an outside end (``ended``) and/or the finished game's episode, in one transaction;
        an outside end of a game not by the referee (abandoned, ended by the admin) is also kept
        as an event."""

        def end(s: Session) -> None:
            row = s.get_one(GameRow, game_id)
            if ended is not None:
                row.ended = ended
            if episode is not None:
                row.status, row.episode = "done", episode
            row.updated_at = _now()
            if ended is not None and ended.get("status") == "abandoned":
                study = s.get_one(ParticipantRow, row.participant_id).study
                s.add(EventRow(study=study, kind="game_abandoned", detail={"game": game_id, **ended}))

        self.write("end_game", end)


def _why(exc: BaseException) -> str:
    """An exception in one line: a database error's own message, without SQLAlchemy's
    statement and background link."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _sqlite_file(engine: Any) -> str | None:
    """The path of a SQLite database's file (None for other databases and in-memory ones)."""
    if engine.url.get_backend_name() != "sqlite":
        return None
    name = engine.url.database or ""
    if name.startswith("file:"):
        name = name.removeprefix("file:").split("?")[0]
    if not name or name == ":memory:" or "mode=memory" in str(engine.url):
        return None
    return os.path.abspath(name)


def _identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the file, None when it is gone."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _add_missing_columns(engine: Any) -> None:
    """Add the nullable columns a database made by an earlier parlay lacks (``participants.ended_at``)."""
    present = inspect(engine)
    with engine.begin() as conn:
        for table in Base.metadata.sorted_tables:
            have = {c["name"] for c in present.get_columns(table.name)}
            for column in table.columns:
                if column.name not in have and column.nullable:
                    kind = column.type.compile(engine.dialect)
                    conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
