"""The dashboard behind API keys: a login form, a session cookie, and a gate on every /ui path.

When the server has API keys (always, off loopback), nothing under /ui answers without one: not
the JSON API, not the page shells, not the static assets. A browser gets there through the login
form (`GET /ui/login`, no script or stylesheet from the server: its CSS and the one line of
script are inline, allowed by their CSP hashes). `POST /ui/login` checks the key as the API does
(constant-time, the key's rate limit) and sets the cookie `shipyard_ui`: the key itself, so every
worker process can check it against the same keys file (revoking the key ends the session),
`HttpOnly` (page scripts cannot read it), `SameSite=Strict` (no other site's page sends it),
`Path=/ui` (the inference routes never see it), `Secure` over HTTPS, no expiry (closing the
browser ends it). `POST /ui/logout` clears it.

`UIAuth` (pure ASGI) lets a request under /ui through when it has a valid key, by header or
cookie; a cookie becomes the request's `Authorization: Bearer` header, so the JSON routes check
scopes, rate limits and record the key's name exactly as for a header. A write sent with the
cookie must come from this origin (its `Origin` header, when present, names this host). Without
a key a page is redirected to the login form and anything else answers 401. Always open: the
login form, `POST /ui/api/csp-report` (browsers send reports without credentials; it is
size-limited and its list needs a key), and the redirects `/` and `/ui`.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
from http.cookies import SimpleCookie
from urllib.parse import parse_qs, quote, urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from shipyard.serve.errors import RequestError
from shipyard.serve.http import read_body, state_of

COOKIE = "shipyard_ui"
_OPEN = {("GET", "/ui/login"), ("POST", "/ui/login"), ("POST", "/ui/api/csp-report")}
_OPEN_PATHS = {"/", "/ui"}
_SAFE = {"GET", "HEAD", "OPTIONS"}
_MAX_FORM = 4 << 10

_STYLE = (
    "body{font:15px/1.45 system-ui,sans-serif;margin:0;min-height:100vh;display:grid;"
    "place-items:center;background:#f6f7f9;color:#16181d}"
    "form{background:#fff;border:1px solid #dde1e7;border-radius:10px;padding:24px;width:min(380px,"
    "calc(100% - 32px))}h1{font-size:18px;margin:0 0 8px}p{color:#5b6472;font-size:13px}"
    "input{width:100%;box-sizing:border-box;font:inherit;padding:8px;margin:8px 0 14px;"
    "border:1px solid #dde1e7;border-radius:6px}button{font:inherit;background:#2563eb;color:#fff;"
    "border:0;border-radius:6px;padding:8px 14px;cursor:pointer}.error{color:#dc2626}"
    "@media (prefers-color-scheme:dark){body{background:#0f1115;color:#e6e8ec}"
    "form{background:#171a21;border-color:#2a2f3a}input{background:#12151b;color:#e6e8ec;"
    "border-color:#2a2f3a}p{color:#9aa3b2}}"
)
# the playground calls the inference routes, which take only a bearer header: keep the key in
# this tab's sessionStorage for it, as the Key button does
_SCRIPT = (
    'document.getElementById("login").addEventListener("submit",function(){'
    'sessionStorage.setItem("shipyard.apiKey",document.getElementById("key").value.trim())});'
)


def _hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


LOGIN_CSP = (
    f"default-src 'none'; style-src {_hash(_STYLE)}; script-src {_hash(_SCRIPT)}; "
    "img-src data:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


def safe_next(target: str | None) -> str:
    """Where to go after logging in: a dashboard path on this server, else /ui/."""
    if not target or not target.startswith("/ui") or target.startswith("//") or "\\" in target:
        return "/ui/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return "/ui/"
    return target


def login_page(next_url: str, error: str | None = None) -> str:
    """The login form (self-contained: inline style and script, allowed by LOGIN_CSP)."""
    message = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,"><title>Log in · shipyard</title>'
        f"<style>{_STYLE}</style></head><body>"
        '<form id="login" method="post" action="/ui/login">'
        "<h1>shipyard dashboard</h1>"
        "<p>This server checks API keys. Enter one (any scope; promoting and registering need an "
        "admin key). It is kept in a cookie for this browser session only.</p>"
        f"{message}"
        '<label for="key">API key</label>'
        '<input id="key" name="key" type="password" autocomplete="off" spellcheck="false" '
        'placeholder="sy_xxxxxxxx_..." required autofocus>'
        f'<input type="hidden" name="next" value="{html.escape(next_url)}">'
        '<button type="submit">Log in</button></form>'
        f"<script>{_SCRIPT}</script></body></html>"
    )


def _login_response(next_url: str, error: str | None, status: int) -> HTMLResponse:
    return HTMLResponse(
        login_page(next_url, error),
        status_code=status,
        headers={"Content-Security-Policy": LOGIN_CSP, "Cache-Control": "no-store"},
    )


def build_login() -> APIRouter:
    """GET/POST /ui/login and POST /ui/logout."""
    router = APIRouter(include_in_schema=False)

    @router.get("/ui/login", response_model=None)
    async def login_form(request: Request, next: str = "/ui/") -> Response:
        if state_of(request).keys is None:  # no keys: nothing to log in to
            return RedirectResponse(safe_next(next), status_code=303)
        return _login_response(safe_next(next), None, 200)

    @router.post("/ui/login", response_model=None)
    async def login(request: Request) -> Response:
        state = state_of(request)
        form = parse_qs((await read_body(request, _MAX_FORM)).decode(errors="replace"))
        target = safe_next((form.get("next") or ["/ui/"])[0])
        if state.keys is None:
            return RedirectResponse(target, status_code=303)
        key = (form.get("key") or [""])[0].strip()
        try:
            if state.limiter is not None:
                state.limiter.check(request.client.host if request.client else "-")
            record = state.keys.authenticate(f"Bearer {key}")  # constant-time comparison
        except RequestError as exc:
            return _login_response(target, exc.message, exc.status)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            COOKIE,
            key,
            path="/ui",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        request.state.key_id = record.id
        return response

    @router.post("/ui/logout", response_model=None)
    async def logout(request: Request) -> Response:
        response = RedirectResponse("/ui/login", status_code=303)
        response.delete_cookie(COOKIE, path="/ui", httponly=True, samesite="strict")
        return response

    return router


def _cookie(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"cookie":
            jar: SimpleCookie = SimpleCookie()
            try:
                jar.load(value.decode("latin-1"))
            except Exception:  # a malformed Cookie header is no cookie
                continue
            if COOKIE in jar:
                return jar[COOKIE].value
    return None


class UIAuth:
    """Pure ASGI middleware: every /ui request needs a valid key when the server has keys (see
    the module docstring). Other paths pass untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path.startswith("/ui/") or path in _OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        keys = state_of(request).keys
        method = scope.get("method", "GET")
        if keys is None or (method, path) in _OPEN:
            await self.app(scope, receive, send)
            return
        headers: list[tuple[bytes, bytes]] = list(scope.get("headers", []))
        header = next((v for k, v in headers if k == b"authorization"), None)
        if header is None:
            cookie = _cookie(headers)
            if cookie is not None:
                if method not in _SAFE and not _same_origin(headers):
                    await _deny(send, 403, "cross-origin write refused")
                    return
                headers.append((b"authorization", f"Bearer {cookie}".encode("latin-1")))
                scope = {**scope, "headers": headers}
                header = headers[-1][1]
        if path.startswith("/ui/api/"):  # the route checks the key, its scope and rate
            await self.app(scope, receive, send)
            return
        try:
            keys.authenticate(header.decode("latin-1") if header is not None else None)
        except RequestError:
            if method in _SAFE and not path.startswith("/ui/static/"):
                query = scope.get("query_string") or b""
                target = path + ("?" + query.decode("latin-1") if query else "")
                await _redirect(send, "/ui/login?next=" + quote(target, safe=""))
            else:
                await _deny(send, 401, "missing or invalid API key: log in at /ui/login")
            return
        await self.app(scope, receive, send)


def _same_origin(headers: list[tuple[bytes, bytes]]) -> bool:
    origin = next((v for k, v in headers if k == b"origin"), None)
    if origin is None:  # same-origin fetches of some browsers, and non-browser clients
        return True
    host = next((v for k, v in headers if k == b"host"), b"")
    return urlsplit(origin.decode("latin-1")).netloc.encode("latin-1") == host


async def _deny(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": _headers(b"application/json", len(body), status == 401),
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _redirect(send: Send, location: str) -> None:
    headers = _headers(b"text/plain; charset=utf-8", 0, False)
    headers.append((b"location", location.encode("latin-1")))
    await send({"type": "http.response.start", "status": 303, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


def _headers(content_type: bytes, length: int, challenge: bool) -> list[tuple[bytes, bytes]]:
    out: list[tuple[bytes, bytes]] = [
        (b"content-type", content_type),
        (b"content-length", str(length).encode()),
        (b"cache-control", b"no-store"),
    ]
    if challenge:
        out.append((b"www-authenticate", b"Bearer"))
    return out
