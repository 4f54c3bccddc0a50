"""The page's HTTP side: a Starlette app served by uvicorn on its own thread and event loop.

    GET  /                   the page (static/index.html; every asset ships in the package, no CDN)
    GET  /static/NAME        its script and style sheet
    GET  /stream.mjpg        the live frame with its heatmap, MJPEG (multipart/x-mixed-replace)
    GET  /frame.jpg          the latest frame once
    GET  /gallery/ID.jpg     a FAIL of the gallery
    GET  /api/state?since=N  run, counts, recent scores after N, latest decision, gallery, thresholds
    GET  /metrics            Prometheus (hgad_edge.runtime.web.metrics)
    POST /api/session        bearer token -> session cookie (for <img> streams where looking needs the token)
    POST /api/threshold      {"class", "threshold", "action": "apply" | "save"}     (token)
    POST /api/undo           the bundle's last calibration undone                    (token)
    POST /api/mark           {"id", "mark": "good" | "defect" | null}                 (token)

Frames are encoded here, only while someone watches, at the pace of `WebServer.live_period` (at most
`max_fps` a second, and slower where drawing a frame would take more than LIVE_CPU_SHARE of a core);
a stream sends the newest frame when its viewer has taken the last one, so a slow viewer sees fewer
frames and never slows the run (the run loop only swaps a reference, hgad_edge.runtime.web.state).
Nobody watching, the drawing loop wakes once a second, for the gallery's thumbnails only. Access rules:
hgad_edge.runtime.web.access; on a loopback bind the Host header must name this machine, so a web
page elsewhere cannot reach the station through a DNS name pointed at 127.0.0.1. The server writes
no access log; its own warnings never carry a header.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import socket
import threading
import time
from importlib import resources
from typing import TYPE_CHECKING, Any

from hgad_edge.runtime.web.access import SESSION_COOKIE, WebError, is_loopback
from hgad_edge.runtime.web.render import LIVE_MAX_SIDE, THUMB_MAX_SIDE, overlay_jpeg

if TYPE_CHECKING:
    from hgad_edge.runtime.web.page import LivePage

__all__ = ["WebServer", "bind_socket"]

log = logging.getLogger("hgad_edge.runtime")

STATIC = ("index.html", "app.js", "style.css", "favicon.svg")
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' blob:; style-src 'self'; script-src 'self'; "
        b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]
GALLERY_PER_TICK = 2  # FAIL thumbnails drawn per tick at most; older undrawn ones may drop out
# The live frame's budget: drawing and encoding it may take at most this share of one core. The page must
# cost the run < 5 % of its frames/s; inference keeps every core busy in parallel sections, so a share of a
# core the page takes stalls it by about that share, and sending, polls and the viewer need their part too.
LIVE_CPU_SHARE = 0.02
IDLE_TICK_S = 1.0  # nobody watching: the drawing loop's tick (thumbnails free the FAILs' full-size frames)
STREAM_RECHECK_S = 1.0  # a stream waiting for a new frame looks at least this often whether the page stops
START_TIMEOUT_S = 10.0


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound now (before any model loads), or WebError naming the fix."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise WebError(f"--web host {host!r} is not an address of this machine ({err.strerror})") from err
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(64)
    except OSError as err:
        sock.close()
        taken = err.errno == errno.EADDRINUSE
        why = "is in use (another run's page?)" if taken else f"cannot be bound ({err.strerror or err})"
        raise WebError(f"--web {host}:{port} {why}; pick another port, e.g. --web {host}:0 for a free one") from err
    sock.setblocking(False)
    return sock


class WebServer:
    """uvicorn serving the page's app on `sock`, on a daemon thread; `stop()` ends it."""

    def __init__(self, page: LivePage, sock: socket.socket) -> None:
        import uvicorn

        self.page, self.sock = page, sock
        self.viewers = 0
        self.live_jpeg: tuple[int, bytes] | None = None
        self.draw_s = 0.0  # the live frame's recent drawing + encoding time (moving average, wall seconds)
        self.stopping = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.wake: asyncio.Event | None = None  # the drawing loop's: a first viewer came, or the page stops
        self.fresh: asyncio.Event | None = None  # the streams': set (then replaced) when a new live frame is drawn
        config = uvicorn.Config(
            _app(page, self),
            log_level="warning",
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=1,
            server_header=False,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._serve, name="hgad-edge web", daemon=True)

    def _serve(self) -> None:
        self.server.run(sockets=[self.sock])

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise WebError("the live page's server did not start (see the warnings above)")
            time.sleep(0.01)

    def stop(self) -> None:
        self.stopping = True
        if self.loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has ended already
                self.loop.call_soon_threadsafe(self.notify)
        self.server.should_exit = True
        self.thread.join(START_TIMEOUT_S)
        self.sock.close()

    # ---- drawing, on the server's event loop ----------------------------------------------------
    def live_period(self) -> float:
        """Seconds between live frames: 1 / max_fps, or longer where drawing one frame (`draw_s`) would
        take more than LIVE_CPU_SHARE of a core at that rate (large frames, a slow or busy CPU)."""
        return max(1.0 / self.page.options.max_fps, self.draw_s / LIVE_CPU_SHARE)

    def notify(self) -> None:
        """Wake the drawing loop and every stream (on the event loop): a first viewer, a new frame, stopping."""
        if self.wake is not None:
            self.wake.set()
        if self.fresh is not None:
            self.fresh.set()
            self.fresh = asyncio.Event()

    async def render_loop(self) -> None:
        """Thumbnails of new FAILs (freeing their frames) each tick; the live frame while watched, paced by
        `live_period`. Nobody watching, a tick a second; a first viewer wakes the loop at once."""
        self.loop, self.wake, self.fresh = asyncio.get_running_loop(), asyncio.Event(), asyncio.Event()
        while not self.stopping:
            started = time.perf_counter()
            try:
                self.render_once()
            except Exception:  # a drawing bug must not end the page; the run is unaffected either way
                log.exception("live page: drawing a frame failed")
            pause = self.live_period() if self.viewers else IDLE_TICK_S
            self.wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), max(0.0, pause - (time.perf_counter() - started)))

    def render_once(self) -> None:
        state, vrange = self.page.state, self.page.vrange
        for shot in state.undrawn(GALLERY_PER_TICK):
            state.drawn(shot, overlay_jpeg(shot.image, shot.amap, shot.record, vrange, THUMB_MAX_SIDE))
        latest = state.latest()
        if self.viewers and latest is not None and (self.live_jpeg is None or self.live_jpeg[0] != latest[0]):
            seq, image, amap, record = latest
            started = time.perf_counter()
            self.live_jpeg = (seq, overlay_jpeg(image, amap, record, vrange, LIVE_MAX_SIDE))
            took = time.perf_counter() - started
            self.draw_s = took if self.draw_s == 0.0 else 0.8 * self.draw_s + 0.2 * took
            self.notify()


def _app(page: LivePage, web: WebServer) -> Any:
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    from hgad_edge.core.errors import HgadRuntimeError
    from hgad_edge.runtime.web.metrics import exposition

    access = page.access
    no_store = {"cache-control": "no-store"}

    def refused(status: int, message: str) -> JSONResponse:
        headers = {**no_store, **({"www-authenticate": "Bearer"} if status == 401 else {})}
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    def static(request: Request) -> Response:
        name = request.path_params.get("name", "index.html")
        if name not in STATIC:
            return refused(404, "no such file")
        data = (resources.files("hgad_edge.runtime.web") / "static" / name).read_bytes()
        return Response(data, media_type=TYPES[name[name.rindex(".") :]], headers={"cache-control": "no-cache"})

    def state(request: Request) -> JSONResponse:
        try:
            since = int(request.query_params.get("since", "0"))
        except ValueError:
            return refused(400, "since must be an integer")
        body = page.state.snapshot(since)
        body["thresholds"] = None if page.control is None else page.control.view()
        body["live"] = page.live()
        body["access"] = {"open_reads": access.options.open_reads}
        body["max_fps"] = page.options.max_fps
        return JSONResponse(body, headers=no_store)

    async def stream(request: Request) -> StreamingResponse:
        async def parts():
            web.viewers += 1
            if web.viewers == 1 and web.wake is not None:
                web.wake.set()  # the drawing loop was on its idle tick: the first frame now
            try:
                sent = None
                while not web.stopping:
                    current = web.live_jpeg
                    if current is not None and current[0] != sent:
                        sent, jpeg = current
                        yield b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n%s\r\n" % (
                            len(jpeg),
                            jpeg,
                        )
                        continue  # a newer frame may have come while this one was sent
                    if web.fresh is None:  # not started yet (only before the lifespan ran)
                        await asyncio.sleep(0.05)
                        continue
                    with contextlib.suppress(asyncio.TimeoutError):  # woken by the next frame, or to recheck
                        await asyncio.wait_for(web.fresh.wait(), STREAM_RECHECK_S)
            finally:
                web.viewers -= 1

        return StreamingResponse(parts(), media_type="multipart/x-mixed-replace; boundary=frame", headers=no_store)

    def frame(request: Request) -> Response:
        latest = page.state.latest()
        if latest is None:
            return refused(404, "no frame scored yet")
        seq, image, amap, record = latest
        jpeg = overlay_jpeg(image, amap, record, page.vrange, LIVE_MAX_SIDE)
        return Response(jpeg, media_type="image/jpeg", headers={**no_store, "x-frame-id": str(seq)})

    def gallery(request: Request) -> Response:
        shot = page.state.shot(request.path_params["seq"])
        if shot is None or shot.jpeg is None:
            return refused(404, "that FAIL is no longer (or not yet) in the gallery")
        return Response(shot.jpeg, media_type="image/jpeg", headers={"cache-control": "private, max-age=3600"})

    def metrics(request: Request) -> Response:
        thresholds = {} if page.control is None else page.control.view()["run"]
        body, kind = exposition(page.state, page.live, lambda: thresholds)
        return Response(body, media_type=kind, headers=no_store)

    def session(request: Request) -> JSONResponse:
        if not access.is_operator(request.headers.get("authorization")):
            return refused(401, "wrong or missing operator token")
        response = JSONResponse({"ok": True}, headers=no_store)
        response.set_cookie(SESSION_COOKIE, access.new_session(), httponly=True, samesite="strict", path="/")
        return response

    async def change(request: Request) -> JSONResponse:
        """The three writes: the token, a JSON body, the change off the event loop; errors as one line."""
        if not access.is_operator(request.headers.get("authorization")):
            return refused(401, "changes need the operator token (printed when the run started)")
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError:
            return refused(400, "the body must be JSON")
        if not isinstance(body, dict):
            return refused(400, "the body must be a JSON object")
        what = request.path_params["what"]
        if what not in ("threshold", "undo", "mark"):
            return refused(404, "no such change: POST /api/threshold, /api/undo or /api/mark")
        try:
            if what == "mark":
                return JSONResponse(page.state.mark(body.get("id"), body.get("mark")), headers=no_store)
            if page.control is None:
                return refused(409, "the run has not started yet (the model is loading)")
            if what == "undo":
                view = await run_in_threadpool(page.control.undo)
            elif body.get("action") in ("apply", "save"):
                act = page.control.apply if body["action"] == "apply" else page.control.save
                view = await run_in_threadpool(act, body.get("class"), body.get("threshold"))
            else:
                return refused(400, 'action must be "apply" (this run only) or "save" (into the bundle)')
        except KeyError:
            return refused(404, "that FAIL is no longer in the gallery")
        except (ValueError, HgadRuntimeError) as err:
            return refused(400, str(err))
        except OSError as err:
            return refused(500, f"could not write the bundle: {err.strerror or err}")
        return JSONResponse(view, headers=no_store)

    @asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(web.render_loop())
        try:
            yield
        finally:
            web.stopping = True
            task.cancel()

    routes = [
        Route("/", static),
        Route("/static/{name}", static),
        Route("/api/state", state),
        Route("/stream.mjpg", stream),
        Route("/frame.jpg", frame),
        Route("/gallery/{seq:int}.jpg", gallery),
        Route("/metrics", metrics),
        Route("/api/session", session, methods=["POST"]),
        Route("/api/{what:str}", change, methods=["POST"]),
    ]
    return _Guard(Starlette(routes=routes, lifespan=lifespan), page)


class _Guard:
    """ASGI middleware: the Host check on loopback binds, the token where looking needs it, security headers."""

    OPEN = ("/static/", "/api/session")  # and "/": the page itself holds no data, it asks for the token

    def __init__(self, app: Any, page: LivePage) -> None:
        self.app, self.page = app, page
        host = page.options.host
        self.hosts = {"127.0.0.1", "localhost", "::1", host.lower()} if is_loopback(host) else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        problem = None
        if self.hosts is not None and _hostname(headers.get("host", "")) not in self.hosts:
            problem = (403, "this page answers to this machine's own names only (127.0.0.1, localhost)")
        elif not (path == "/" or path.startswith(self.OPEN)):
            cookie = _cookie(headers.get("cookie", ""), SESSION_COOKIE)
            if not self.page.access.may_read(headers.get("authorization"), cookie):
                problem = (401, "this station's page needs the operator token")
        if problem is not None:
            body = json.dumps({"error": problem[1]}).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": problem[0],
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]
                    + SECURITY_HEADERS,
                }
            )
            await send({"type": "http.response.body", "body": body})
            return

        async def secured(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, secured)


def _hostname(host: str) -> str:
    """The name of a Host header without its port ([::1]:8080 -> ::1)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None
