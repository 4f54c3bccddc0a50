"""Webhook sink: each decision as one JSON POST to an http(s):// URL (stdlib urllib, no extra needed).

    https://mes.plant/api/inspections?timeout=3
    http://user:pw@10.0.0.5:8080/hook              Basic auth (or HGAD_EDGE_WEBHOOK_USER / _PASSWORD)

HGAD_EDGE_WEBHOOK_TOKEN, when set, is sent as `Authorization: Bearer ...`. Every POST carries the
message id as `Idempotency-Key`, so a receiver can drop a repeat. Options (taken out of the URL that
is posted to; any other query parameter is the receiver's and stays): timeout (s per request,
default 5), retries (how often a message the receiver refuses with a 4xx is tried before it is
dropped and counted as rejected, default 3), ca (a CA file for https), queue=, flush=.

2xx is delivered. No answer, a timeout, 408, 429 and 5xx are an outage: the message stays queued and
is sent again, in order, when the receiver answers. Any other 4xx is the receiver refusing that
message; after `retries` tries it is dropped (and counted), so one bad message cannot block the line.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
import urllib.error
import urllib.request
from urllib.parse import urlencode, urlunsplit

from hgad_edge import __version__
from hgad_edge.runtime.sinks.base import QUEUE_PARAMS, Sink, SinkDown, SinkRejected, SinkURL

__all__ = ["WebhookSink"]

OWN_PARAMS = ("timeout", "retries", "ca")
TRANSIENT = (408, 425, 429)


class WebhookSink(Sink):
    schemes = ("http", "https")
    kind = "WEBHOOK"
    default_ports = {"http": 80, "https": 443}
    params = None  # the receiver's own query parameters pass through

    def __init__(self, url: SinkURL) -> None:
        super().__init__(url)
        self.host_port  # noqa: B018 - a URL without a host fails here, before the run
        self.timeout_s = self.float_param("timeout", 5.0, 0.1)
        self.retries = self.int_param("retries", 3, 1)
        ca = self.path_param("ca")
        self._context = ssl.create_default_context(cafile=ca) if url.scheme == "https" else None
        # the address posted to: no user info (sent as a header), none of our options
        kept = [(k, v) for k, v in url.params.items() if k not in (*OWN_PARAMS, *QUEUE_PARAMS)]
        self.target = urlunsplit((url.scheme, url.netloc, url.raw_path or "/", urlencode(kept), ""))
        self._headers = {"Content-Type": "application/json", "User-Agent": f"hgad-edge/{__version__}"}
        user, password = self.credentials()
        if user is not None:
            token = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
            self._headers["Authorization"] = f"Basic {token}"
        if os.environ.get("HGAD_EDGE_WEBHOOK_TOKEN"):
            self._headers["Authorization"] = f"Bearer {os.environ['HGAD_EDGE_WEBHOOK_TOKEN']}"
        self._refusals: dict[str, int] = {}

    def send(self, payloads: list[str]) -> int:
        for done, payload in enumerate(payloads):
            message_id = str(json.loads(payload).get("id", ""))
            request = urllib.request.Request(
                self.target, payload.encode(), {**self._headers, "Idempotency-Key": message_id}, method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s, context=self._context) as answer:
                    answer.read()
            except urllib.error.HTTPError as err:
                err.close()
                if err.code >= 500 or err.code in TRANSIENT:
                    raise SinkDown(f"the receiver answered HTTP {err.code} {err.reason}", done) from err
                tries = self._refusals.get(message_id, 0) + 1
                self._refusals[message_id] = tries
                if tries >= self.retries:
                    self._refusals.pop(message_id, None)
                    raise SinkRejected(
                        f"message {message_id} refused {tries}x with HTTP {err.code} {err.reason}", done
                    ) from err
                raise SinkDown(
                    f"the receiver refused message {message_id}: HTTP {err.code} {err.reason}", done
                ) from err
            except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
                reason = getattr(err, "reason", err)
                raise SinkDown(f"no answer from the receiver ({reason})", done) from err
            self._refusals.pop(message_id, None)
        return len(payloads)
