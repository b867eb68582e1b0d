"""What every route of the web app reads: one ``WebState`` per app, and the authentication
dependencies built on it (a participant's token, the admin token), with one way of refusing."""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request

from parlay.web.hub import Hub
from parlay.web.limits import MAX_TOKEN_CHARS, RateLimit
from parlay.web.store import ParticipantRow, Store, token_hash
from parlay.web.study import Study


class HTTPRefusal(Exception):
    """A request refused at the HTTP level (authentication, rate, size): answered with ``status``
    and ``{"detail", "code"}``, as the hub's refusals are."""

    def __init__(self, status: int, detail: str, code: str | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.code = status, detail, code


@dataclass
class WebState:
    """The study being served and what serves it; set once on ``app.state.web`` by ``create_app``."""

    study: Study
    store: Store
    hub: Hub
    admin_hash: str
    """SHA-256 of the admin token (compared in constant time)."""
    limiter: RateLimit
    """Requests per participant."""
    failures: RateLimit
    """Failed authentications per client address."""
    poll_seconds: float
    """How long ``GET /api/games/{id}?after=V`` waits for a change before answering."""


def get_state(request: Request) -> WebState:
    return request.app.state.web


State = Annotated[WebState, Depends(get_state)]


def refuse_auth(state: WebState, request: Request, status: int, detail: str) -> HTTPRefusal:
    """The refusal of a failed authentication, counted against the client's address: past the
    failure budget the answer is 429 whatever the reason, so tokens cannot be tried in bulk."""
    if not state.failures.allow(request.client.host if request.client else "?"):
        return HTTPRefusal(429, "too many failed attempts; wait a moment")
    return HTTPRefusal(status, detail)


def bearer(state: WebState, request: Request, authorization: str | None) -> str:
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN_CHARS:
        raise refuse_auth(state, request, 401, "missing or malformed token: open the link you were given")
    return token


async def participant(
    state: State, request: Request, authorization: Annotated[str | None, Header()] = None
) -> ParticipantRow:
    """The participant whose token the request carries (401 otherwise), within their rate limit."""
    token = bearer(state, request, authorization)
    row = await asyncio.to_thread(state.store.participant, token)
    if row is None or row.study != state.study.name:
        raise refuse_auth(state, request, 401, "unknown token: open the link you were given")
    if not state.limiter.allow(row.id):
        raise HTTPRefusal(429, "too many requests; slow down")
    return row


async def admin(state: State, request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    """Passes only with the admin token (401 without a token, 403 with another)."""
    token = bearer(state, request, authorization)
    if not hmac.compare_digest(token_hash(token), state.admin_hash):
        raise refuse_auth(state, request, 403, "wrong admin token")


Participant = Annotated[ParticipantRow, Depends(participant)]
Admin = Annotated[None, Depends(admin)]
