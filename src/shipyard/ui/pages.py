"""The dashboard's pages: server-rendered HTML shells (sandboxed, autoescaped Jinja) that the
page script fills from the JSON endpoints. No inline script or style: the CSP forbids both."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import FileSystemLoader, select_autoescape
from jinja2.sandbox import SandboxedEnvironment

from shipyard import __version__

TEMPLATES = Path(__file__).parent / "templates"
PAGES = {
    "runs": "Runs",
    "run": "Run",
    "compare": "Compare",
    "registry": "Registry",
    "server": "Server",
    "playground": "Playground",
}
NAV = ("runs", "compare", "registry", "server", "playground")

_env = SandboxedEnvironment(
    loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(default=True)
)


def render_page(page: str, **context: str) -> str:
    """The HTML of one page (`page` is a key of PAGES)."""
    template = _env.get_template(f"{page}.html")
    return template.render(
        page=page,
        title=PAGES[page],
        nav=[(p, PAGES[p]) for p in NAV],
        version=__version__,
        **context,
    )


def build_pages() -> APIRouter:
    """GET /ui/... page routes (and / → /ui/)."""
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    async def root() -> RedirectResponse:
        return RedirectResponse("/ui/", status_code=307)

    @router.get("/ui")
    async def ui_root() -> RedirectResponse:
        return RedirectResponse("/ui/", status_code=307)

    @router.get("/ui/", response_class=HTMLResponse)
    async def runs_page() -> str:
        return render_page("runs")

    @router.get("/ui/runs/{run_id:path}", response_class=HTMLResponse)
    async def run_page(run_id: str) -> str:
        return render_page("run", run_id=run_id)

    @router.get("/ui/compare", response_class=HTMLResponse)
    async def compare_page() -> str:
        return render_page("compare")

    @router.get("/ui/registry", response_class=HTMLResponse)
    async def registry_page() -> str:
        return render_page("registry")

    @router.get("/ui/server", response_class=HTMLResponse)
    async def server_page() -> str:
        return render_page("server")

    @router.get("/ui/playground", response_class=HTMLResponse)
    async def playground_page() -> str:
        return render_page("playground")

    return router
