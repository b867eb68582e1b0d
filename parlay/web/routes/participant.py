"""The participant's API: their stage, consent, the comprehension check, their games and moves.

Answers are only ever about the participant's own games, never hold the partner's values, and
never name the condition or the agent. A game's state arrives by long polling:
``GET /api/games/{id}?after=V`` answers as soon as the game's version exceeds V (or after the
app's ``poll_seconds``).
"""

import asyncio
from contextlib import suppress
from typing import Annotated, Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, field_validator

from parlay import prompts
from parlay.games.dond import MAX_COUNT
from parlay.protocol import ErrorCode, Message, ProtocolError, message_reply, parse_reply, proposal_reply
from parlay.web import results
from parlay.web.hub import InvalidMove, LiveGame, NoSuchGame, NotNow
from parlay.web.state import Participant, State, WebState
from parlay.web.store import ParticipantRow
from parlay.web.study import comprehension_questions, grade, instructions

router = APIRouter(prefix="/api")


class _Body(BaseModel):
    """Request bodies: unknown keys refused, and strict types (``true``, ``"1"`` or ``1.0`` is no count)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class ConsentIn(_Body):
    agree: bool
    """Only ``true`` (strictly: not 1, not "true"); declining is the page's, no request."""

    @field_validator("agree")
    @classmethod
    def _agreed(cls, value: bool) -> bool:
        if value is not True:
            raise ValueError("Input should be true: consent is given by agreeing")
        return value


class CheckIn(_Body):
    answers: dict[Annotated[str, Field(max_length=32)], Annotated[int, Field(ge=0, le=9)]] = Field(max_length=10)


class MoveIn(_Body):
    move_id: str = Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    """Made by the browser once per move; a resend with the same id is applied once."""
    kind: Literal["message", "proposal"]
    text: str | None = Field(None, max_length=2000)
    kept: list[Annotated[int, Field(ge=0, le=MAX_COUNT)]] | None = Field(None, min_length=3, max_length=3)


async def owned(state: WebState, game_id: str, p: ParticipantRow) -> LiveGame:
    live = await state.hub.get(game_id) if len(game_id) <= 96 else None
    if live is None or live.row.participant_id != p.id:
        raise NoSuchGame("no such game")  # the same answer for someone else's game
    return live


async def require_stage(state: WebState, p: ParticipantRow, wanted: str) -> str:
    games = await asyncio.to_thread(state.store.games_of, p.id)
    now = results.stage(p, len(results.over(games)), state.study)
    if now != wanted:
        raise NotNow(f"this step is not open now (you are at: {now})")
    return now


@router.get("/me")
async def me(p: Participant, state: State) -> dict[str, Any]:
    study, store = state.study, state.store
    games = await asyncio.to_thread(store.games_of, p.id)
    done = results.finished(games)
    now = results.stage(p, len(results.over(games)), study)
    obj = study.objective_for(p.number)
    out: dict[str, Any] = {
        "stage": now,
        "games_total": study.games_per_participant,
        "games_done": len(done),
        "games_over": len(results.over(games)),
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
        out |= {
            "points": results.points(done),
            "points_per_game": [g.episode["rewards"][0] for g in done],  # type: ignore[index]
            "bonus": results.bonus(p, games, study),
            "bonus_per_point": study.bonus_per_point,
            "currency": study.currency,
            "completion_code": study.completion_code,
        }
    return out


@router.post("/consent")
async def consent(body: ConsentIn, p: Participant, state: State) -> dict[str, Any]:
    if p.consented_at is None:
        await asyncio.to_thread(state.store.mark, p.id, "consented_at")
    return {"ok": True}


@router.post("/check")
async def check(body: CheckIn, p: Participant, state: State) -> dict[str, Any]:
    if p.checked_at is not None:
        return {"passed": True, "wrong": []}
    await require_stage(state, p, "check")
    wrong = grade(state.study.objective_for(p.number), body.answers)
    await asyncio.to_thread(state.store.mark, p.id, "" if wrong else "checked_at", 1)
    return {"passed": not wrong, "wrong": wrong}


@router.post("/games/next")
async def next_game(p: Participant, state: State) -> dict[str, Any]:
    if p.consented_at is None or p.checked_at is None:
        raise NotNow("give consent and pass the check first")
    live = await state.hub.next_game(p)
    if live is None:
        return {"done": True}
    return {"done": False, "game": state.hub.view(live)}


@router.get("/games/{game_id}")
async def game_state(game_id: str, p: Participant, state: State, after: int | None = None) -> dict[str, Any]:
    live = await owned(state, game_id, p)
    if after is not None and live.version <= after:
        with suppress(TimeoutError):
            await asyncio.wait_for(live.changed.wait(), timeout=state.poll_seconds)
    return state.hub.view(live)


@router.post("/games/{game_id}/moves")
async def move(game_id: str, body: MoveIn, p: Participant, state: State) -> dict[str, Any]:
    live = await owned(state, game_id, p)
    text = reply_text(body, state.study.max_message_chars)
    seq = await state.hub.human_move(live, body.move_id, text)
    return {"seq": seq, "game": state.hub.view(live)}


def reply_text(body: MoveIn, max_chars: int) -> str:
    """A person's move as a protocol reply, or an ``InvalidMove`` that says what is wrong with it."""
    if body.kind == "proposal":
        if body.kept is None or body.text is not None:
            raise InvalidMove("a proposal gives 'kept' (books, hats, balls you keep) and no text")
        return proposal_reply(tuple(body.kept))  # type: ignore[arg-type]
    if body.kept is not None or body.text is None:
        raise InvalidMove("a message gives 'text' and no 'kept'")
    text = " ".join("".join(ch for ch in body.text if ch.isprintable() or ch.isspace()).split())
    if not text:
        raise InvalidMove("Your message is empty: write something to your partner.", "empty_message")
    if len(text) > max_chars:
        raise InvalidMove(f"Your message is longer than {max_chars} characters: say it in fewer words.", "too_long")
    reply = message_reply(text)
    parsed = parse_reply(reply)
    if isinstance(parsed, ProtocolError) and parsed.code is ErrorCode.SPECIAL_TOKEN:
        return reply  # the game refuses it, with the protocol's own code and feedback (Hub.human_move)
    if not isinstance(parsed, Message) or parsed.text != text:
        raise InvalidMove("Messages cannot contain tags in square brackets such as [propose] or [end].", "tag")
    return reply
