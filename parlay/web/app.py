"""The study web app: FastAPI routes over the hub (live games, model workers) and the store.

Participants open ``/play#token=…``; the page keeps the token out of the URL sent to the server
(it is in the fragment) and sends it as a bearer token. The API answers only about the
participant's own games, never with the partner's values, and never names the condition or the
agent. A game's state arrives by long polling: ``GET /api/games/{id}?after=V`` answers as soon
as the game's version exceeds V (or after ``poll_seconds``), so the partner's reply and its
"typing" state appear without a reload. The admin page ``/admin#token=…`` reads
``/api/admin/*`` with the admin token.

Every body is validated and length-limited, bodies over ``MAX_BODY`` bytes are refused before
they are read, each participant has a token-bucket rate limit, and every page is served with a
content security policy that allows no inline script, so chat text can only ever be text.
"""

import asyncio
import hmac
import logging
import time
from contextlib import asynccontextmanager, suppress
from importlib import resources
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from parlay import prompts
from parlay.agents.base import Agent
from parlay.games.dond import MAX_COUNT
from parlay.protocol import ErrorCode, Message, ProtocolError, message_reply, parse_reply, proposal_reply
from parlay.web import results
from parlay.web.hub import Hub, LiveGame, Refused
from parlay.web.store import ParticipantRow, Store, token_hash
from parlay.web.study import Study, comprehension_questions, grade, instructions

log = logging.getLogger(__name__)

MAX_BODY = 8192
"""The largest request body accepted, in bytes."""
MAX_TOKEN_CHARS = 128


class RateLimit:
    """A token bucket per key: ``burst`` requests at once, refilled at ``per_second``."""

    def __init__(self, per_second: float = 5.0, burst: int = 30) -> None:
        self.per_second, self.burst = per_second, burst
        self._buckets: dict[Any, tuple[float, float]] = {}

    def allow(self, key: Any) -> bool:
        now = time.monotonic()
        tokens, last = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.per_second)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - 1.0, now)
        return True


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ConsentIn(_Body):
    agree: Literal[True]


class CheckIn(_Body):
    answers: dict[Annotated[str, Field(max_length=32)], Annotated[int, Field(ge=0, le=9)]] = Field(max_length=10)


class MoveIn(_Body):
    move_id: str = Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    """Made by the browser once per move; a resend with the same id is applied once."""
    kind: Literal["message", "proposal"]
    text: str | None = Field(None, max_length=2000)
    kept: list[Annotated[int, Field(ge=0, le=MAX_COUNT)]] | None = Field(None, min_length=3, max_length=3)


_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


def create_app(
    study: Study,
    store: Store,
    agents: dict[str, Agent],
    admin_token: str,
    *,
    batch_wait: float = 0.02,
    poll_seconds: float = 20.0,
    rate: RateLimit | None = None,
) -> FastAPI:
    """The app for one study; ``agents`` maps each condition's agent spec to a loaded agent."""
    missing = {c.agent for c in study.conditions} - set(agents)
    if missing:
        raise ValueError(f"no agent loaded for {sorted(missing)}")
    store.ensure_study(study)
    hub = Hub(study, store, agents, batch_wait)
    limiter = rate or RateLimit()
    failures = RateLimit(per_second=1.0, burst=20)  # wrong tokens, per client address
    admin_hash = token_hash(admin_token)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):  # type: ignore[no-untyped-def]
        await hub.start()
        try:
            yield
        finally:
            await hub.stop()

    app = FastAPI(title="parlay study", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.hub = hub
    app.mount("/static", StaticFiles(packages=[("parlay.web", "static")]), name="static")

    @app.middleware("http")
    async def guard(request: Request, call_next):  # type: ignore[no-untyped-def]
        if request.method in ("POST", "PUT", "PATCH"):
            length = request.headers.get("content-length")
            if length is None or not length.isdigit():
                return JSONResponse({"detail": "a request body needs a Content-Length"}, status_code=411)
            if int(length) > MAX_BODY:
                return JSONResponse({"detail": f"request body over {MAX_BODY} bytes"}, status_code=413)
        response = await call_next(request)
        response.headers.update(_SECURITY_HEADERS)
        return response

    @app.exception_handler(Refused)
    async def refused(_request: Request, exc: Refused) -> JSONResponse:
        return JSONResponse({"detail": exc.detail, "code": exc.code}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e["loc"] if p != "body")
            problems.append(f"{where}: {e['msg']}" if where else e["msg"])
        return JSONResponse({"detail": "; ".join(problems) or "invalid request"}, status_code=422)

    def bearer(authorization: str | None, request: Request) -> str:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN_CHARS:
            if not failures.allow(request.client.host if request.client else "?"):
                raise Refused(429, "too many failed attempts; wait a moment")
            raise Refused(401, "missing or malformed token: open the link you were given")
        return token

    async def participant(request: Request, authorization: Annotated[str | None, Header()] = None) -> ParticipantRow:
        token = bearer(authorization, request)
        row = await asyncio.to_thread(store.participant, token)
        if row is None or row.study != study.name:
            if not failures.allow(request.client.host if request.client else "?"):
                raise Refused(429, "too many failed attempts; wait a moment")
            raise Refused(401, "unknown token: open the link you were given")
        if not limiter.allow(row.id):
            raise Refused(429, "too many requests; slow down")
        return row

    async def admin(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
        token = bearer(authorization, request)
        if not hmac.compare_digest(token_hash(token), admin_hash):
            if not failures.allow(request.client.host if request.client else "?"):
                raise Refused(429, "too many failed attempts; wait a moment")
            raise Refused(403, "wrong admin token")

    Participant = Annotated[ParticipantRow, Depends(participant)]

    async def owned(game_id: str, p: ParticipantRow) -> LiveGame:
        live = await hub.get(game_id) if len(game_id) <= 96 else None
        if live is None or live.row.participant_id != p.id:
            raise Refused(404, "no such game")  # the same answer for someone else's game
        return live

    async def require_stage(p: ParticipantRow, wanted: str) -> str:
        done = results.finished(await asyncio.to_thread(store.games_of, p.id))
        now = results.stage(p, len(done), study)
        if now != wanted:
            raise Refused(409, f"this step is not open now (you are at: {now})")
        return now

    # -- pages

    @app.get("/", include_in_schema=False)
    async def index() -> RedirectResponse:
        return RedirectResponse("/play")

    def page(name: str) -> FileResponse:
        return FileResponse(str(resources.files("parlay.web").joinpath("static", name)), media_type="text/html")

    @app.get("/play", include_in_schema=False)
    async def play_page() -> FileResponse:
        return page("play.html")

    @app.get("/admin", include_in_schema=False)
    async def admin_page() -> FileResponse:
        return page("admin.html")

    # -- participant API

    @app.get("/api/me")
    async def me(p: Participant) -> dict[str, Any]:
        games = await asyncio.to_thread(store.games_of, p.id)
        done = results.finished(games)
        now = results.stage(p, len(done), study)
        obj = study.objective_for(p.number)
        out: dict[str, Any] = {
            "stage": now,
            "games_total": study.games_per_participant,
            "games_done": len(done),
            "consent": study.consent,
            "instructions": instructions(obj, study.max_messages),
            "objective": prompts.objective_text(obj),
            "live_game": next((g.id for g in games if g.status == "live"), None),
        }
        if now == "check":
            out["questions"] = [{k: q[k] for k in ("id", "text", "options")} for q in comprehension_questions(obj)]
        if now == "done":
            if p.finished_at is None:
                await asyncio.to_thread(store.mark, p.id, "finished_at")
            total = results.points(done)
            out |= {
                "points": total,
                "bonus": study.bonus(total),
                "currency": study.currency,
                "completion_code": study.completion_code,
            }
        return out

    @app.post("/api/consent")
    async def consent(body: ConsentIn, p: Participant) -> dict[str, Any]:
        if p.consented_at is None:
            await asyncio.to_thread(store.mark, p.id, "consented_at")
        return {"ok": True}

    @app.post("/api/check")
    async def check(body: CheckIn, p: Participant) -> dict[str, Any]:
        if p.checked_at is not None:
            return {"passed": True, "wrong": []}
        await require_stage(p, "check")
        wrong = grade(study.objective_for(p.number), body.answers)
        await asyncio.to_thread(store.mark, p.id, "" if wrong else "checked_at", 1)
        return {"passed": not wrong, "wrong": wrong}

    @app.post("/api/games/next")
    async def next_game(p: Participant) -> dict[str, Any]:
        if p.consented_at is None or p.checked_at is None:
            raise Refused(409, "give consent and pass the check first")
        live = await hub.next_game(p)
        if live is None:
            return {"done": True}
        return {"done": False, "game": hub.view(live)}

    @app.get("/api/games/{game_id}")
    async def game_state(game_id: str, p: Participant, after: int | None = None) -> dict[str, Any]:
        live = await owned(game_id, p)
        if after is not None and live.version <= after:
            with suppress(TimeoutError):
                await asyncio.wait_for(live.changed.wait(), timeout=poll_seconds)
        return hub.view(live)

    @app.post("/api/games/{game_id}/moves")
    async def move(game_id: str, body: MoveIn, p: Participant) -> dict[str, Any]:
        live = await owned(game_id, p)
        text = reply_text(body, study.max_message_chars)
        seq = await hub.human_move(live, body.move_id, text)
        return {"seq": seq, "game": hub.view(live)}

    # -- admin API

    Admin = Annotated[None, Depends(admin)]

    @app.get("/api/admin/summary")
    async def summary(_: Admin) -> dict[str, Any]:
        data = await asyncio.to_thread(results.study_results, store, study)
        return data | {"workers": hub.stats()}

    @app.get("/api/admin/export.jsonl")
    async def export_jsonl(_: Admin) -> PlainTextResponse:
        text = await asyncio.to_thread(results.export_jsonl, store, study)
        return _download(text, f"{study.name}-episodes.jsonl", "application/x-ndjson")

    @app.get("/api/admin/export.csv")
    async def export_csv(_: Admin) -> PlainTextResponse:
        text = await asyncio.to_thread(results.export_csv, store, study)
        return _download(text, f"{study.name}-games.csv", "text/csv")

    return app


def reply_text(body: MoveIn, max_chars: int) -> str:
    """A person's move as a protocol reply, or a 422 that says what is wrong with it."""
    if body.kind == "proposal":
        if body.kept is None or body.text is not None:
            raise Refused(422, "a proposal gives 'kept' (books, hats, balls you keep) and no text")
        return proposal_reply(tuple(body.kept))  # type: ignore[arg-type]
    if body.kept is not None or body.text is None:
        raise Refused(422, "a message gives 'text' and no 'kept'")
    text = " ".join("".join(ch for ch in body.text if ch.isprintable() or ch.isspace()).split())
    if not text:
        raise Refused(422, "Your message is empty: write something to your partner.", "empty_message")
    if len(text) > max_chars:
        raise Refused(422, f"Your message is longer than {max_chars} characters: say it in fewer words.", "too_long")
    reply = message_reply(text)
    parsed = parse_reply(reply)
    if isinstance(parsed, ProtocolError) and parsed.code is ErrorCode.SPECIAL_TOKEN:
        return reply  # the game refuses it, with the protocol's own code and feedback (Hub.human_move)
    if not isinstance(parsed, Message) or parsed.text != text:
        raise Refused(422, "Messages cannot contain tags in square brackets such as [propose] or [end].", "tag")
    return reply


def _download(text: str, name: str, media_type: str) -> PlainTextResponse:
    return PlainTextResponse(
        text, media_type=media_type, headers={"Content-Disposition": f'attachment; filename="{name}"'}
    )
