"""The web console: one page and its static files, shipped in the package (no build step, no
CDN). The page itself is public; everything it shows comes from the API, which asks for the key
when LADDER_API_KEY is set."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

CONSOLE_DIR = Path(__file__).parents[1] / "console"
STATIC_PREFIX = "/console"

router = APIRouter(include_in_schema=False)


@router.get("/")
def console() -> FileResponse:
    return FileResponse(CONSOLE_DIR / "index.html", headers={"Cache-Control": "no-cache"})


def mount(app: FastAPI) -> None:
    app.include_router(router)
    app.mount(STATIC_PREFIX, StaticFiles(directory=CONSOLE_DIR), name="console")
