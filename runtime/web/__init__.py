"""The operator's live page of a run (`hgad-edge run ... --web HOST:PORT`), with Prometheus `/metrics`.

    access.py   bind address, operator token, sessions (who may look, who may change)
    state.py    what the run loop hands over per frame: a latest-frame slot, counts, recent scores, FAILs
    render.py   the frame and its heatmap as JPEG, drawn on the web thread
    control.py  thresholds: for this run only, or saved into the bundle as `hgad-edge calibrate` saves
    metrics.py  the Prometheus exposition, read at scrape time
    server.py   the Starlette app on uvicorn, on its own thread and event loop
    page.py     LivePage: the run's listener that ties them together
    static/     the page: HTML, JavaScript, CSS (package data, no CDN)

Starlette, uvicorn and prometheus-client (the `web` extra) are imported only when a page starts.
"""

from hgad_edge.runtime.web.access import WebError, WebOptions
from hgad_edge.runtime.web.control import ThresholdStore
from hgad_edge.runtime.web.page import LivePage

__all__ = ["LivePage", "ThresholdStore", "WebError", "WebOptions"]
