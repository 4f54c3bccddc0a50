"""Credentials out of everything printed or written: one helper for source URLs. Torch-free.

Camera URLs carry passwords (rtsp://user:pass@cam/stream), and passwords hold any character,
'@', ':' and '/' included, so the URL is split on its structure (scheme, then the LAST '@' of
the rest, which ends the user info) rather than matched by a pattern. Secret-looking query
parameters (?password=...) are masked too. Masking more than needed is harmless; less is not.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["MASK", "redact_text", "redact_url"]

MASK = "***"
_SECRET_PARAMS = {"password", "passwd", "pass", "pwd", "user", "username", "token", "auth", "key", "secret", "apikey"}


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
    """Mask every URL-looking word of a message (an OpenCV error that quotes the stream URL)."""
    return " ".join(redact_url(word) if "://" in word else word for word in str(text).split(" "))
