"""The two HTML pages; everything else they load is under ``/static``."""

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

router = APIRouter(include_in_schema=False)


def page(name: str) -> FileResponse:
    return FileResponse(str(resources.files("parlay.web").joinpath("static", name)), media_type="text/html")


@router.get("/")
async def index() -> RedirectResponse:
    return RedirectResponse("/play")


@router.get("/play")
async def play_page() -> FileResponse:
    return page("play.html")


@router.get("/admin")
async def admin_page() -> FileResponse:
    return page("admin.html")
