"""The station page's web app: live view (SSE), parts gallery, part page with reviews, line health.

Pages are rendered on the server with Jinja2 (autoescape on: every part id, file name and reason
is text, never markup) and made live with htmx and its SSE extension, both shipped in static/ so
a line PC without internet works. A Content-Security-Policy allows scripts from this origin only,
a second line of defence should anything ever slip through the escaping.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from importlib import resources
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from edge.ui.auth import CSRF_COOKIE, SESSION_COOKIE, SESSION_S, Auth
from edge.ui.evidence_files import EvidenceFiles
from edge.ui.listener import StationListener
from edge.ui.store import PartQuery, Store, StoreError

HERE = resources.files("edge.ui")
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; "
       "frame-ancestors 'none'; form-action 'self'; base-uri 'none'")
PER_PAGE = 24
MAX_PAGE = 10_000_000  # beyond any index (ui.keep_events); a larger ?page= would overflow SQLite's OFFSET
ACTION_LABELS = {"confirm_fail": "confirmed defect", "false_alarm": "false alarm", "escape": "escape (missed defect)"}


def utc(ts: Any) -> str:
    try:
        return datetime.fromtimestamp(float(ts), tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (TypeError, ValueError, OverflowError, OSError):
        return "?"


def parse_time(value: str | None, field: str) -> float | None:
    """A datetime-local form value (taken as UTC) -> epoch seconds; a clear error otherwise."""
    if not value:
        return None
    try:
        when = datetime.fromisoformat(value)
        return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()
    except ValueError:
        raise HTTPException(400, f"{field}: expected a date and time like 2026-01-31T08:00, got {value[:40]!r}") from None


def create_app(store: Store, listener: StationListener, auth: Auth, evidence: EvidenceFiles, *,  # noqa: C901, PLR0915 - the routes are closures over the app's store/listener/auth; each one is small
               live_hz: float = 4.0, login_to_view: bool = False, cookie_secure: bool = False,
               station_name: str = "") -> FastAPI:
    app = FastAPI(title="Station page", docs_url=None, redoc_url=None, openapi_url=None)
    templates = Jinja2Templates(directory=str(HERE / "templates"))  # .html: autoescape on
    templates.env.filters["utc"] = utc
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    def reviewer(request: Request) -> str | None:
        return auth.reviewer(request.cookies.get(SESSION_COOKIE))

    def render(request: Request, name: str, status_code: int = 200, **ctx: Any) -> HTMLResponse:
        csrf_cookie = request.cookies.get(CSRF_COOKIE) or request.state.new_csrf
        ctx.update(reviewer=reviewer(request), csrf=auth.csrf_token(csrf_cookie), login_enabled=auth.enabled,
                   station_name=station_name, labels=ACTION_LABELS)
        return templates.TemplateResponse(request, name, ctx, status_code=status_code)

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        """Security headers, the CSRF cookie, CSRF checks on every POST, and optional login-to-view."""
        request.state.new_csrf = secrets.token_urlsafe(24)
        if request.method == "POST" and not request.headers.get("content-type", "").startswith(
                "application/x-www-form-urlencoded"):  # the forms' own token is checked by csrf_form()
            return HTMLResponse("refused: POST takes form data only", 415)
        if request.method != "POST" and login_to_view and reviewer(request) is None and not request.url.path.startswith(("/login", "/static", "/healthz")):
            return RedirectResponse("/login", 303)
        response: Response = await call_next(request)
        response.headers.update({"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                                 "Referrer-Policy": "same-origin", "X-Frame-Options": "DENY"})
        if CSRF_COOKIE not in request.cookies:
            response.set_cookie(CSRF_COOKIE, request.state.new_csrf, httponly=True, samesite="strict",
                                secure=cookie_secure)
        return response

    async def csrf_form(request: Request) -> dict[str, str]:
        """The POSTed form, after its CSRF token matched this browser's CSRF cookie (every POST calls this)."""
        form = {k: str(v) for k, v in (await request.form()).items()}
        if not auth.csrf_ok(request.cookies.get(CSRF_COOKIE), form.get("csrf")):
            raise HTTPException(403, "refused: missing or wrong CSRF token (reload the page and try again)")
        return form

    # -- live view ---------------------------------------------------------------------------------
    def live_context() -> dict[str, Any]:
        return {"part": listener.latest or store.latest(), "station": listener.station_state(), "now": time.time(),
                "preview_seq": listener.preview_seq, "preview_event": listener.preview_event}

    @app.get("/", response_class=HTMLResponse)
    async def live(request: Request) -> HTMLResponse:
        return render(request, "live.html", **live_context())

    @app.get("/live/fragment", response_class=HTMLResponse)
    async def live_fragment(request: Request) -> HTMLResponse:
        return render(request, "_live.html", **live_context())

    @app.get("/live/stream")
    async def live_stream(request: Request) -> StreamingResponse:
        """Server-sent events: the rendered live panel whenever something changed, at most live_hz a second."""
        fragment = templates.get_template("_live.html")

        async def events() -> AsyncIterator[bytes]:
            seen, last_sent = -1, 0.0
            while not await request.is_disconnected():
                now = time.monotonic()
                if listener.version != seen or now - last_sent > 10:  # heartbeat keeps proxies from closing it
                    seen, last_sent = listener.version, now
                    html = fragment.render(**live_context(), labels=ACTION_LABELS)
                    yield ("event: live\n" + "".join(f"data: {line}\n" for line in html.splitlines()) + "\n").encode()
                await asyncio.sleep(1.0 / live_hz)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @app.get("/live/preview.jpg")
    async def live_preview() -> Response:
        """The daemon's newest small preview (edge.preview), kept in memory only."""
        jpeg = listener.preview
        if jpeg is None:
            return Response(evidence.placeholder("preview"), 404, media_type="image/svg+xml")
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    # -- parts -------------------------------------------------------------------------------------
    @app.get("/parts", response_class=HTMLResponse)
    async def parts(request: Request, verdict: str = "", part: str = "", since: str = "", until: str = "",
                    page: int = 0) -> HTMLResponse:
        if verdict not in ("", "pass", "fail", "error"):
            raise HTTPException(400, f"verdict: expected pass, fail or error, got {verdict[:20]!r}")
        q = PartQuery(verdict=verdict or None, part=part[:256] or None, since_ts=parse_time(since, "since"),
                      until_ts=parse_time(until, "until"), page=min(max(0, page), MAX_PAGE), per_page=PER_PAGE)
        rows, total = store.parts(q)
        filters = {"verdict": verdict, "part": part[:256], "since": since, "until": until}
        return render(request, "parts.html", rows=rows, total=total, page=q.page,
                      pages=max(1, -(-total // PER_PAGE)), filters=filters)

    @app.get("/parts/{event_id}", response_class=HTMLResponse)
    async def part_page(request: Request, event_id: str, error: str = "") -> HTMLResponse:
        event = store.event(event_id)
        if event is None:
            raise HTTPException(404, "no such part in the page's index (it may be older than ui.keep_events)")
        return render(request, "part.html", part=event, reviews=store.reviews(event_id),
                      files=evidence.available(event), error=error[:300])

    @app.post("/parts/{event_id}/review")
    async def review(request: Request, event_id: str) -> Response:
        form = await csrf_form(request)
        name = reviewer(request)
        if name is None:
            return HTMLResponse("refused: log in to review parts", 403)
        action = str(form.get("action", ""))
        box = None
        if form.get("box_w") and form.get("box_h"):
            try:
                box = [int(float(str(form.get(k, "0")))) for k in ("box_x", "box_y", "box_w", "box_h")]
            except (ValueError, OverflowError):  # "abc", "nan", "1e400"
                return HTMLResponse("refused: box fields must be finite numbers", 400)
        try:
            message = store.add_review(event_id, action, name, box, str(form.get("note", "")))
        except StoreError as e:
            return render(request, "part.html", status_code=400, part=store.event(event_id) or {},
                          reviews=store.reviews(event_id), files={}, error=str(e)) \
                if store.event(event_id) else HTMLResponse(f"refused: {e}", 404)
        listener.publish_review(message)
        return RedirectResponse(f"/parts/{event_id}", 303)

    @app.get("/evidence/{event_id}/{kind}")
    async def evidence_file(event_id: str, kind: str) -> Response:
        event = store.event(event_id)
        path = evidence.path(event, kind) if event else None
        if path is None:  # an image body with the 404, so an <img> shows "no image" instead of a broken icon
            return Response(evidence.placeholder(kind), 404, media_type="image/svg+xml")
        return FileResponse(path, headers={"Cache-Control": "private, max-age=3600"})

    # -- line health -------------------------------------------------------------------------------
    @app.get("/health", response_class=HTMLResponse)
    async def health(request: Request, hours: float = 8.0) -> HTMLResponse:
        hours = min(max(hours, 0.1), 24 * 7) if math.isfinite(hours) else 8.0
        data = store.health(time.time() - hours * 3600, bucket_s=max(60.0, hours * 3600 / 48))
        return render(request, "health.html", hours=hours, data=data, alarms=store.alarm_history(),
                      station=listener.station_state())

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        return JSONResponse({"ok": True, "broker_connected": listener.connected, "dropped": listener.dropped})

    # -- login -------------------------------------------------------------------------------------
    @app.get("/login", response_class=HTMLResponse)
    async def login_page(request: Request) -> HTMLResponse:
        return render(request, "login.html", error="")

    @app.post("/login")
    async def login(request: Request) -> Response:
        form = await csrf_form(request)
        name = await run_in_threadpool(auth.login, str(form.get("name", ""))[:64], str(form.get("password", "")))
        if name is None:
            await asyncio.sleep(0.5)  # slows guessing; scrypt already costs ~50 ms per try
            return render(request, "login.html", status_code=401,
                          error="wrong name or password" if auth.enabled else "no reviewers are set up")
        response = RedirectResponse("/", 303)
        response.set_cookie(SESSION_COOKIE, auth.session_cookie(name), max_age=SESSION_S, httponly=True,
                            samesite="strict", secure=cookie_secure)
        return response

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        await csrf_form(request)
        response = RedirectResponse("/", 303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    return app
