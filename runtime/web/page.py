"""LivePage: the operator's page of one run, shaped like the run's other listener (the sinks' Publisher).

    with LivePage(WebOptions.parse("127.0.0.1:8080"), store).start() as page:   # port bound, server up
        run_app(bundle, source, headless=True, web=page)                          # open_for / publish / finish

`start` binds the port before any model loads (a taken port is a one-line error) and serves a page
that says the model is loading; `open_for` gives it the run (detector, run id, source, live counts);
`publish` is the run loop's per-frame call (hgad_edge.runtime.web.state: a reference swap and a few
counts); `finish` marks the run ended, and the page stays up until `close` (the end of the `with`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from hgad_edge.core.redact import redact_url
from hgad_edge.runtime.web.access import Access, WebOptions, is_loopback
from hgad_edge.runtime.web.control import ThresholdControl, ThresholdStore
from hgad_edge.runtime.web.state import LiveState

__all__ = ["LivePage"]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)  # stdout may carry the run's JSON lines (--output -)


class LivePage:
    """The page of one run; see the module docstring. `store` saves thresholds into the bundle (None:
    a station on an inference server, where the page applies thresholds to the run only)."""

    def __init__(self, options: WebOptions, store: ThresholdStore | None = None) -> None:
        self.options, self.store = options, store
        self.access = Access(options)
        self.state = LiveState(options.recent, options.gallery)
        self.control: ThresholdControl | None = None
        self.live: Callable[[], dict[str, Any]] = dict
        self.vrange: tuple[float, float] = (0.0, 1.0)
        self.port = options.port
        self._server: Any = None

    @property
    def url(self) -> str:
        host = self.options.host
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.port}/"

    def start(self, announce: Callable[[str], None] = _stderr) -> LivePage:
        """Bind, serve, and say where (and, for a generated token, the token: once, here only)."""
        from hgad_edge.runtime.web.server import WebServer, bind_socket

        sock = bind_socket(self.options.host, self.options.port)
        self.port = sock.getsockname()[1]
        self._server = WebServer(self, sock)
        try:
            self._server.start()
        except BaseException:
            self._server.stop()
            raise
        who = "anyone on this machine can look" if self.options.open_reads else "looking needs the operator token too"
        network = "" if is_loopback(self.options.host) else " (reachable from the network)"
        announce(f"live page: {self.url}{network}; {who}; threshold changes need the operator token")
        if self.options.token_generated:
            announce(f"operator token (generated for this run): open {self.url}#token={self.options.token}")
        announce(f"Prometheus metrics: {self.url}metrics")
        return self

    def open_for(self, detector: Any, run: str, source: str, live: Callable[[], dict[str, Any]] = dict) -> LivePage:
        """The run this page shows: `live()` gives the run's counts so far (dropped, corrupt, lost frames,
        reconnects, fps, queue_depths), read when the page polls or Prometheus scrapes."""
        info = detector.info
        self.control = ThresholdControl(detector, self.store)
        self.vrange = tuple(info["display_range"])
        self.live = live
        self.state.begin(
            {
                "run": run,
                "source": redact_url(source),
                "backend": info["backend"],
                "precision": info["precision"],
                "bundle": redact_url(info["bundle"]),
                "classes": list(info["classes"]),
                "normalized_threshold": info["normalized_threshold"],
                "tiled": info["tiling"] is not None,
            }
        )
        return self

    def publish(self, image: np.ndarray, amap: np.ndarray, record: dict[str, Any]) -> None:
        """One scored frame, from the run loop: never waits for the page or a viewer."""
        self.state.add(image, amap, record)

    def finish(self) -> None:
        self.state.end()

    def close(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> LivePage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
