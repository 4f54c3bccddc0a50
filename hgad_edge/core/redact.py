"""Credentials out of everything printed or written: the one place that masks URLs of every kind
(camera streams, inference servers, result sinks: rtsp://, http://, grpc://, mqtt://, postgresql://, ...).
Torch-free.

URLs carry passwords (rtsp://user:pass@cam/stream, grpc://user:pass@server:8001), and passwords hold
any character, '@', ':' and '/' included, so a URL is split on its structure (scheme, then the LAST
'@' of the rest, which ends the user info) rather than matched by a pattern. Secret-looking query
parameters (?password=...) are masked too. Masking more than needed is harmless; less is not. Code
that holds a URL masks it with `redact_url` before any message is built; `redact_text` is for
messages written by others (OpenCV, gRPC) that may quote one.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["MASK", "redact_text", "redact_url"]

MASK = "***"
_SECRET_PARAMS = {
    "password",
    "passwd",
    "pass",
    "pwd",
    "user",
    "username",
    "token",
    "access_token",
    "auth",
    "key",
    "api_key",
    "apikey",
    "secret",
    "client_secret",
    "sslpassword",
}
# a URL inside a message: scheme:// up to whitespace or a quote (a password with a space is cut there:
# code that knows its URL masks it with redact_url before the message is written)
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"`<>]*")


def redact_url(text: str) -> str:
    """rtsp://user:p@ss/w@cam/x?pwd=1 -> rtsp://***@cam/x?pwd=***; text without '://' is returned as is."""
    scheme, sep, rest = str(text).partition("://")
    if not sep:
        return str(text)
    if "@" in rest:
        rest = f"{MASK}@{rest.rpartition('@')[2]}"
    parts = urlsplit(f"{scheme}://{rest}")
    if not parts.query:
        return f"{scheme}://{rest}"
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    query = urlencode([(k, MASK if k.lower() in _SECRET_PARAMS else v) for k, v in pairs], safe="*")
    return urlunsplit(parts._replace(query=query))


def redact_text(text: str) -> str:
    """Mask every URL quoted in a message (an OpenCV or gRPC error that names the stream or server)."""
    return _URL_IN_TEXT.sub(lambda match: redact_url(match.group(0)), str(text))
