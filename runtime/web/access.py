"""Who may see and change what on the live page: the bind address, the operator token, sessions.

The page binds 127.0.0.1 unless told otherwise. There is always an operator token (given with
--web-token / $HGAD_EDGE_WEB_TOKEN, or generated at start and printed once): changing a threshold or
marking a frame needs it, as an `Authorization: Bearer` header, which another web site cannot make a
browser send (no cookie is ever enough to change anything). Bound to loopback, anyone on this
machine may look; bound to anything else, looking needs the token too, as the bearer header (what
Prometheus sends) or as the session cookie the page gets for it (what an <img> stream sends).
The token is never written into the page, a URL the server sees, or a log line.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
import secrets
from dataclasses import dataclass

__all__ = ["SESSION_COOKIE", "Access", "WebError", "WebOptions", "is_loopback"]

MIN_TOKEN = 16  # characters: a token someone picks must not be guessable in a few thousand requests
SESSION_COOKIE = "hgad_edge_session"
MAX_SESSIONS = 64  # browsers logged in at once; the oldest is forgotten beyond that


class WebError(ValueError):
    """The page cannot start as asked (bad address, weak token, port taken); the message names the fix."""


def is_loopback(host: str) -> bool:
    """Whether `host` reaches this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class WebOptions:
    """Where the page listens and how it is protected; `parse` builds it from --web and --web-token.

    host/port: the bind (port 0: a free one, said at start); token: the operator token (generated when
    None is given, then `token_generated`); open_reads: whether looking needs no token (loopback binds);
    max_fps: the most frames a second the page encodes and sends; recent: scores kept for the slider,
    the histogram and the trend; gallery: FAILs kept with their heatmaps.
    """

    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None
    open_reads: bool | None = None
    max_fps: float = 8.0
    recent: int = 2000
    gallery: int = 12
    token_generated: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise WebError(f"web port must be 0..65535, got {self.port!r}")
        if self.token is None:
            object.__setattr__(self, "token", secrets.token_urlsafe(24))
            object.__setattr__(self, "token_generated", True)
        elif len(self.token) < MIN_TOKEN or not self.token.isprintable() or " " in self.token:
            raise WebError(
                f"--web-token must be at least {MIN_TOKEN} printable characters without spaces; "
                "leave it out to get a generated one"
            )
        if self.open_reads is None:
            object.__setattr__(self, "open_reads", is_loopback(self.host))
        if not self.max_fps > 0 or self.recent < 10 or self.gallery < 1:
            got = f"{self.max_fps}, {self.recent}, {self.gallery}"
            raise WebError(f"the page needs max_fps > 0, recent >= 10 and gallery >= 1, got {got}")

    @classmethod
    def parse(cls, bind: str, token: str | None = None) -> WebOptions:
        """From --web: PORT, HOST:PORT or [IPv6]:PORT (a bare PORT binds 127.0.0.1)."""
        text = bind.strip()
        match = re.fullmatch(r"(?:\[(?P<v6>[0-9a-fA-F:.]+)\]|(?P<host>[^:\[\]]*)):(?P<port>\d+)|(?P<only>\d+)", text)
        if match is None:
            raise WebError(f"--web {bind!r}: give PORT, HOST:PORT or [IPv6]:PORT, e.g. --web 127.0.0.1:8080")
        host = match["v6"] or match["host"] or "127.0.0.1"
        port = int(match["port"] or match["only"])
        if not 0 <= port <= 65535:
            raise WebError(f"--web {bind!r}: the port must be 0..65535")
        return cls(host=host, port=port, token=token)


class Access:
    """Checks one request's credentials against the options' token; keeps the browser sessions."""

    def __init__(self, options: WebOptions) -> None:
        self.options = options
        self._sessions: dict[str, None] = {}  # insertion-ordered: the oldest is dropped first

    def is_operator(self, authorization: str | None) -> bool:
        """Whether an Authorization header carries the token (constant-time compare)."""
        scheme, _, value = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not value:
            return False
        return hmac.compare_digest(value.strip().encode(), self.options.token.encode())

    def may_read(self, authorization: str | None, session: str | None) -> bool:
        return self.options.open_reads or self.is_operator(authorization) or self.has_session(session)

    def has_session(self, session: str | None) -> bool:
        return bool(session) and session in self._sessions

    def new_session(self) -> str:
        """A random session id for the cookie (not derived from the token, so it reveals nothing)."""
        session = secrets.token_urlsafe(24)
        self._sessions[session] = None
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.pop(next(iter(self._sessions)))
        return session
