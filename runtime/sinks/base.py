"""What every sink shares: its URL parsed and checked once, credentials kept out of sight, and the
errors that tell the delivery thread whether to retry.

A sink is written as a URL (`mqtt://user:pw@broker:1883/line1?qos=1`); `SinkURL` splits it once,
`shown` is the same URL with every secret masked (hgad_edge.core.redact) and is the only form that
reaches a message, a log line or the run summary. User and password come from the URL or, when the
URL has none, from HGAD_EDGE_<KIND>_USER / HGAD_EDGE_<KIND>_PASSWORD (KIND: MQTT, OPCUA, WEBHOOK),
so they need not appear in a shell history or a unit file.

Errors: `SinkError` is a configuration the user must fix (bad URL, unknown option, wrong password);
it stops the run before work starts. `SinkDown` is an outage (refused, timed out, no answer): the
delivery thread keeps the messages queued and retries with backoff. `SinkRejected`: the receiver
answered and refused one message for good (an HTTP 4xx after its retries); it is dropped and counted
so that one bad message cannot block the queue behind it.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import parse_qsl, unquote, urlsplit

from hgad_edge.core.redact import redact_url

__all__ = ["QUEUE_PARAMS", "Sink", "SinkDown", "SinkError", "SinkRejected", "SinkURL", "import_client"]

LINE_EXTRA = "pip install 'hgad-edge[line]'"
# Options every queued sink takes in its URL (the delivery's, not the receiver's); a webhook strips them.
QUEUE_PARAMS = ("queue", "flush")
DEFAULT_QUEUE = 100_000  # messages kept on disk per sink while it is down; the oldest go first beyond it
DEFAULT_FLUSH_S = 5.0  # at the end of a run, how long queued messages may still be sent before they stay on disk


class SinkError(ValueError):
    """A sink configuration the user must fix; the message names the sink (masked) and the fix."""


class SinkDown(RuntimeError):
    """The receiver cannot be reached or did not confirm; `delivered` messages of the batch did arrive."""

    def __init__(self, message: str, delivered: int = 0) -> None:
        super().__init__(message)
        self.delivered = delivered


class SinkRejected(SinkDown):
    """The receiver refused message number `delivered` of the batch for good; it is dropped and counted."""


def import_client(module: str, kind: str) -> Any:
    """A sink's client library, imported when the sink is first used (the base install has none)."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise SinkError(f"{kind} sinks need the {module.split('.')[0]} package: {LINE_EXTRA}") from err


@dataclass(frozen=True)
class SinkURL:
    """A sink URL split once. `raw` may hold secrets and is never shown; `shown` masks them."""

    raw: str
    scheme: str
    host: str
    port: int | None
    path: str
    user: str | None
    password: str | None
    params: dict[str, str] = field(default_factory=dict)
    netloc: str = ""  # host[:port] as written, without the user info
    raw_path: str = ""  # the path as written (still %-encoded)
    fragment: str = ""  # after '#' (an MQTT wildcard lands here)

    @property
    def shown(self) -> str:
        return redact_url(self.raw)

    @classmethod
    def parse(cls, raw: str) -> SinkURL:
        scheme, sep, rest = raw.partition("://")
        if not sep:
            raise SinkError(f"sink {raw!r} is not a URL: use scheme://host[:port]/..., e.g. mqtt://broker:1883/line1")
        # the user info ends at the LAST '@' before the path (a password may hold '@', ':' and '/')
        authority_end = len(rest)
        for stop in "/?#":
            at = rest.find(stop, rest.rfind("@") + 1)
            if at != -1:
                authority_end = min(authority_end, at)
        authority, tail = rest[:authority_end], rest[authority_end:]
        userinfo, has_user, hostport = authority.rpartition("@")
        user = password = None
        if has_user:
            name, has_pw, secret = userinfo.partition(":")
            user, password = unquote(name), (unquote(secret) if has_pw else None)
        try:
            parts = urlsplit(f"{scheme}://{hostport}{tail}")
            port = parts.port
        except ValueError as err:
            raise SinkError(f"sink {redact_url(raw)}: {err}") from err
        params = dict(parse_qsl(parts.query, keep_blank_values=True))
        host = parts.hostname or ""
        path = unquote(parts.path)
        return cls(raw, scheme.lower(), host, port, path, user, password, params, hostport, parts.path, parts.fragment)


class Sink:
    """One receiver of decision messages. Subclasses set `schemes` and implement connect/send/close.

    The delivery thread (hgad_edge.runtime.sinks.delivery) is the only caller of connect, send and
    close once the run is under way, so a sink needs no locking of its own. `send` gets the messages
    as JSON text, oldest first, and returns how many arrived (all of them, or raises).
    """

    schemes: ClassVar[tuple[str, ...]] = ()
    kind: ClassVar[str] = ""  # name in messages and env variables (MQTT, OPCUA, WEBHOOK)
    default_ports: ClassVar[dict[str, int]] = {}
    # the URL query options this kind understands besides QUEUE_PARAMS; None: any (a webhook passes the rest on)
    params: ClassVar[tuple[str, ...] | None] = ()
    spooled: ClassVar[bool] = True  # False: a local file, written directly (no disk queue in front of it)
    timeout_s: float = 5.0  # the longest one send or connect may block (the delivery waits this long at close)

    def __init__(self, url: SinkURL) -> None:
        self.url = url
        unknown = sorted(set(url.params) - set(self.params) - set(QUEUE_PARAMS)) if self.params is not None else []
        if unknown:
            known = ", ".join((*self.params, *QUEUE_PARAMS))
            raise SinkError(f"sink {self.name}: unknown option {', '.join(unknown)} (known: {known})")
        self.queue_max = self.int_param("queue", DEFAULT_QUEUE, 1)
        self.flush_s = self.float_param("flush", DEFAULT_FLUSH_S, 0.0)

    # ---- what the delivery needs -------------------------------------------------------------
    @property
    def name(self) -> str:
        """The URL with its secrets masked: how the sink is named everywhere."""
        return self.url.shown

    @property
    def key(self) -> str:
        """A file-name-safe identity of the receiver, without secrets: it names the sink's disk queue,
        so the next run with the same sink re-sends what this one could not."""
        port = self.url.port or self.default_ports.get(self.url.scheme, 0)
        ident = f"{self.url.scheme}://{self.url.host}:{port}{self.url.path}"
        digest = hashlib.sha256(ident.encode()).hexdigest()[:12]
        host = "".join(c if c.isalnum() or c in "-." else "_" for c in self.url.host)[:40] or "local"
        return f"{self.url.scheme.replace('.', '_')}-{host}-{port}-{digest}"

    def connect(self) -> None:
        """Reach the receiver (raise SinkDown when it is away, SinkError when it refuses the configuration)."""

    def send(self, payloads: list[str]) -> int:
        raise NotImplementedError

    def close(self) -> None:
        """Say goodbye where the protocol has a way to (MQTT's status topic) and release the connection."""

    # ---- helpers for subclasses --------------------------------------------------------------
    @property
    def host_port(self) -> tuple[str, int]:
        if not self.url.host:
            raise SinkError(f"sink {self.name} names no host, e.g. {self.url.scheme}://127.0.0.1/...")
        return self.url.host, self.url.port or self.default_ports[self.url.scheme]

    def credentials(self) -> tuple[str | None, str | None]:
        """(user, password): from the URL, else from HGAD_EDGE_<KIND>_USER / _PASSWORD."""
        if self.url.user is not None:
            return self.url.user, self.url.password
        env = f"HGAD_EDGE_{self.kind}_"
        return os.environ.get(env + "USER") or None, os.environ.get(env + "PASSWORD") or None

    def _param(self, name: str, default: Any, cast: Callable[[str], Any], check: Callable[[Any], bool], want: str):
        raw = self.url.params.get(name)
        if raw is None:
            return default
        try:
            value = cast(raw)
        except ValueError:
            value = None
        if value is None or not check(value):
            raise SinkError(f"sink {self.name}: option {name}={raw!r} must be {want}")
        return value

    def int_param(self, name: str, default: int, low: int, high: int | None = None) -> int:
        want = f"an integer >= {low}" + ("" if high is None else f" and <= {high}")
        return self._param(name, default, int, lambda v: v >= low and (high is None or v <= high), want)

    def float_param(self, name: str, default: float, low: float) -> float:
        return self._param(name, default, float, lambda v: v >= low and v < float("inf"), f"a number >= {low}")

    def bool_param(self, name: str, default: bool) -> bool:
        values = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
        return self._param(name, default, lambda s: values.get(s.lower()), lambda v: True, "1/0 or true/false")

    def path_param(self, name: str) -> str | None:
        value = self.url.params.get(name)
        if value is not None and not os.path.isfile(value):
            raise SinkError(f"sink {self.name}: option {name}={value} is not a readable file")
        return value
