"""The study web app: ``create_app`` puts together the hub (live games, model workers), the
store and the routers (``routes/``: pages, participant, admin), which read one shared
``WebState`` (``state.py``).

Participants open ``/play#token=…``; the page keeps the token out of the URL sent to the server
(it is in the fragment) and sends it as a bearer token. The admin page ``/admin#token=…`` reads
``/api/admin/*`` with the admin token.

Every body is validated and length-limited, bodies over ``MAX_BODY`` bytes are refused before
they are read, each participant has a token-bucket rate limit, and every page is served with a
content security policy that allows no inline script, so chat text can only ever be text. The
hub refuses in its own terms (``hub.Refused`` and its kinds); this module maps them to HTTP.
"""

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import SQLAlchemyError

from parlay.agents.base import Agent
from parlay.web.hub import Hub, InvalidMove, NoSuchGame, NotNow, Refused, Unavailable
from parlay.web.limits import MAX_BODY, RateLimit
from parlay.web.routes import admin, pages, participant
from parlay.web.state import HTTPRefusal, WebState
from parlay.web.store import Store, StoreUnavailable, token_hash
from parlay.web.study import Study

__all__ = ["MAX_BODY", "RateLimit", "create_app"]

log = logging.getLogger(__name__)

REFUSAL_STATUS: dict[type[Refused], int] = {NoSuchGame: 404, NotNow: 409, InvalidMove: 422, Unavailable: 503}
"""The HTTP status of each kind of hub refusal."""

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
}
"""Sent with every response, errors included (411, 413, 422, 500, 503)."""


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

    @asynccontextmanager
    async def lifespan(_app: FastAPI):  # type: ignore[no-untyped-def]
        await hub.start()
        try:
            yield
        finally:
            await hub.stop()

    app = FastAPI(title="parlay study", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.hub = hub
    app.state.web = WebState(
        study=study,
        store=store,
        hub=hub,
        admin_hash=token_hash(admin_token),
        limiter=rate if rate is not None else RateLimit(),
        failures=RateLimit(per_second=1.0, burst=20),
        poll_seconds=poll_seconds,
    )
    app.mount("/static", StaticFiles(packages=[("parlay.web", "static")]), name="static")
    for module in (pages, participant, admin):
        app.include_router(module.router)
    _add_guards(app)
    return app


def _add_guards(app: FastAPI) -> None:
    """Body limits and security headers around every route, and the answers to refusals."""

    def answer(status: int, detail: str, code: str | None = None) -> JSONResponse:
        return JSONResponse({"detail": detail, "code": code}, status_code=status, headers=SECURITY_HEADERS)

    @app.middleware("http")
    async def guard(request: Request, call_next):  # type: ignore[no-untyped-def]
        if request.method in ("POST", "PUT", "PATCH"):
            length = request.headers.get("content-length")
            if length is None or not length.isdigit():
                return answer(411, "a request body needs a Content-Length")
            if int(length) > MAX_BODY:
                return answer(413, f"request body over {MAX_BODY} bytes")
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.exception_handler(Refused)
    async def refused(_request: Request, exc: Refused) -> JSONResponse:
        status = next(s for kind, s in REFUSAL_STATUS.items() if isinstance(exc, kind))
        return answer(status, exc.detail, exc.code)

    @app.exception_handler(HTTPRefusal)
    async def http_refused(_request: Request, exc: HTTPRefusal) -> JSONResponse:
        return answer(exc.status, exc.detail, exc.code)

    @app.exception_handler(StoreUnavailable)
    async def store_down(_request: Request, exc: StoreUnavailable) -> JSONResponse:
        return answer(503, f"The study's storage is unavailable: {exc}", "storage")

    @app.exception_handler(SQLAlchemyError)
    async def database_error(_request: Request, exc: SQLAlchemyError) -> JSONResponse:
        log.error("database error: %s", exc)
        return answer(503, "The study's storage is unavailable; please try again in a moment.", "storage")

    @app.exception_handler(Exception)
    async def crashed(_request: Request, exc: Exception) -> JSONResponse:
        # Starlette answers this outside every middleware, so the headers are set here
        log.exception("unhandled error")
        return answer(500, "internal error; please try again", "internal")

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e["loc"] if p != "body")
            problems.append(f"{where}: {e['msg']}" if where else e["msg"])
        return answer(422, "; ".join(problems) or "invalid request")
