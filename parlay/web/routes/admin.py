"""The admin API: the study's results, and its exports. Every route needs the admin token."""

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from parlay.web import results
from parlay.web.state import Admin, State

router = APIRouter(prefix="/api/admin")


@router.get("/summary")
async def summary(_: Admin, state: State) -> dict[str, Any]:
    data = await asyncio.to_thread(results.study_results, state.store, state.study)
    return data | {"workers": state.hub.stats()}


@router.get("/export.jsonl")
async def export_jsonl(_: Admin, state: State) -> PlainTextResponse:
    text = await asyncio.to_thread(results.export_jsonl, state.store, state.study)
    return download(text, f"{state.study.name}-episodes.jsonl", "application/x-ndjson")


@router.get("/export.csv")
async def export_csv(_: Admin, state: State) -> PlainTextResponse:
    text = await asyncio.to_thread(results.export_csv, state.store, state.study)
    return download(text, f"{state.study.name}-games.csv", "text/csv")


def download(text: str, name: str, media_type: str) -> PlainTextResponse:
    return PlainTextResponse(
        text, media_type=media_type, headers={"Content-Disposition": f'attachment; filename="{name}"'}
    )
