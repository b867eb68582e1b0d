"""The admin API: the study's results, and its exports. Every route needs the admin token."""

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from parlay.web import results
from parlay.web.hub import NoSuchGame
from parlay.web.state import Admin, State

router = APIRouter(prefix="/api/admin")


@router.get("/summary")
async def summary(_: Admin, state: State) -> dict[str, Any]:
    """The study's results (``results.study_results``), its live games as they stand
    (``in_progress``), the model workers' figures, and the study's settings the page shows."""
    data = await asyncio.to_thread(results.study_results, state.store, state.study)
    numbers = {p.id: p.number for p in await asyncio.to_thread(state.store.participants, state.study.name)}
    return data | {
        "in_progress": await state.hub.in_progress(numbers),
        "abandon_after_minutes": state.study.abandon_after_minutes,
        "workers": state.hub.stats(),
    }


@router.get("/export.jsonl")
async def export_jsonl(_: Admin, state: State) -> PlainTextResponse:
    text = await asyncio.to_thread(results.export_jsonl, state.store, state.study)
    return download(text, f"{state.study.name}-episodes.jsonl", "application/x-ndjson")


@router.get("/export.csv")
async def export_csv(_: Admin, state: State) -> PlainTextResponse:
    text = await asyncio.to_thread(results.export_csv, state.store, state.study)
    return download(text, f"{state.study.name}-games.csv", "text/csv")


@router.post("/games/{game_id}/end")
async def end_game(game_id: str, _: Admin, state: State) -> dict[str, Any]:
    """End a live game as abandoned (its person left); a game already over is left as it is."""
    live = await state.hub.get(game_id) if len(game_id) <= 96 else None
    if live is None:
        raise NoSuchGame("no such game")
    ended = await state.hub.abandon(live, "abandoned: ended by the researcher")
    if ended:
        await asyncio.to_thread(state.store.record, state.study.name, "game_ended", game=game_id)
    return {"ended": ended, "game": game_id}


@router.post("/participants/{number}/end")
async def end_participant(number: int, _: Admin, state: State) -> dict[str, Any]:
    """End a participant's part: their live game ends as abandoned and they get no further game."""
    people = {p.number: p for p in await asyncio.to_thread(state.store.participants, state.study.name)}
    if number not in people:
        raise NoSuchGame(f"no participant {number}")
    p = people[number]
    await asyncio.to_thread(state.store.mark, p.id, "ended_at")  # first: no new game starts meanwhile
    ended = []
    for row in await asyncio.to_thread(state.store.games_of, p.id):
        live = await state.hub.get(row.id) if row.status == "live" else None
        if live is not None and await state.hub.abandon(live, "abandoned: participant ended by the researcher"):
            ended.append(row.id)
    await asyncio.to_thread(state.store.record, state.study.name, "participant_ended", number=number, games=ended)
    return {"participant": number, "games_ended": ended}


def download(text: str, name: str, media_type: str) -> PlainTextResponse:
    return PlainTextResponse(
        text, media_type=media_type, headers={"Content-Disposition": f'attachment; filename="{name}"'}
    )
