"""The sink kinds, keyed by URL scheme: a new kind is one class and one entry here; `hgad-edge run
--sink`'s help and the parametrised tests read SINKS. Importing this imports no client library
(each sink imports its own when it first connects)."""

from __future__ import annotations

from hgad_edge.core.redact import redact_url
from hgad_edge.runtime.sinks.base import Sink, SinkError, SinkURL
from hgad_edge.runtime.sinks.jsonl import JsonlSink
from hgad_edge.runtime.sinks.mqtt import MqttSink
from hgad_edge.runtime.sinks.opcua import OpcUaSink
from hgad_edge.runtime.sinks.webhook import WebhookSink

__all__ = ["KINDS", "SINKS", "parse_sink"]

KINDS: tuple[type[Sink], ...] = (JsonlSink, MqttSink, OpcUaSink, WebhookSink)
SINKS: dict[str, type[Sink]] = {scheme: kind for kind in KINDS for scheme in kind.schemes}


def parse_sink(url: str) -> Sink:
    """A sink from its URL (a bare *.jsonl path is a JSON-lines file); SinkError names what is wrong."""
    url = str(url).strip()
    if "://" not in url and url.lower().split("?")[0].endswith(".jsonl") and not url.startswith("jsonl:"):
        url = f"jsonl:{url}"
    if url.startswith("jsonl:") and not url.startswith("jsonl://"):
        return JsonlSink(SinkURL(url, "jsonl", "", None, url[len("jsonl:") :], None, None))
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme not in SINKS:
        known = ", ".join(f"{s}://" for s in SINKS if s != "jsonl")
        raise SinkError(f"unknown sink {redact_url(url)!r}: use {known} or jsonl:FILE (or a *.jsonl path)")
    return SINKS[scheme](SinkURL.parse(url))
