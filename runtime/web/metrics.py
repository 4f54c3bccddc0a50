"""`/metrics`: the station in Prometheus' text format (prometheus-client), read when scraped.

Nothing is counted for Prometheus in the run loop: a collector reads the page's LiveState, the run's
live counts (the app's summary so far: dropped, corrupt, lost frames, reconnects) and the sinks' queue
depths at scrape time, on the web thread. Each page has its own registry, so two runs in one process
(tests, a host embedding the app) never share or clash over series.

    hgad_edge_frames_total{class}            frames scored
    hgad_edge_fails_total{class}             frames decided FAIL
    hgad_edge_marked_total{class,mark}       FAILs an operator marked good (false reject) or defect
    hgad_edge_latency_seconds                histogram of the per-frame scoring latency
    hgad_edge_dropped_frames_total           live frames dropped because scoring was slower than the camera
    hgad_edge_corrupt_frames_total           unreadable frames and files skipped
    hgad_edge_lost_frames_total              live frames lost while the inference server was away
    hgad_edge_reconnects_total{to}           source (camera, stream) and inference-server reconnects
    hgad_edge_sink_queue_depth{sink}         decisions waiting for a sink (MQTT, webhook, ...)
    hgad_edge_threshold{class}               the threshold in effect
    hgad_edge_fps                            frames a second since the run began
    hgad_edge_run_info{run,backend,source}   1, with the run's identity as labels
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hgad_edge.core.redact import redact_url
from hgad_edge.runtime.web.state import LATENCY_BUCKETS_S, LiveState

__all__ = ["exposition"]


class _Collector:
    def __init__(self, state: LiveState, live: Callable[[], dict[str, Any]], thresholds: Callable[[], dict]) -> None:
        self.state, self.live, self.thresholds = state, live, thresholds

    def collect(self):
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            InfoMetricFamily,
        )

        counts = self.state.counts()
        frames = CounterMetricFamily("hgad_edge_frames", "Frames scored.", labels=["class"])
        fails = CounterMetricFamily("hgad_edge_fails", "Frames decided FAIL.", labels=["class"])
        marked = CounterMetricFamily(
            "hgad_edge_marked", "FAILs an operator marked: good (a false reject) or defect.", labels=["class", "mark"]
        )
        for name, c in sorted(counts.items()):
            frames.add_metric([name], c["frames"])
            fails.add_metric([name], c["fails"])
            for mark, n in c["marks"].items():
                marked.add_metric([name, mark], n)
        yield from (frames, fails, marked)

        buckets, total_s = self.state.latency()
        cumulative, running = [], 0
        for bound, n in zip((*map(str, LATENCY_BUCKETS_S), "+Inf"), buckets):
            running += n
            cumulative.append((bound, running))
        yield HistogramMetricFamily(
            "hgad_edge_latency_seconds", "Per-frame scoring latency.", buckets=cumulative, sum_value=total_s
        )

        live = self.live()
        for name, key, help_text in (
            ("dropped_frames", "dropped_frames", "Live frames dropped because scoring was slower than the source."),
            ("corrupt_frames", "skipped_corrupt", "Unreadable frames and files skipped."),
            ("lost_frames", "lost_to_server", "Live frames lost while the inference server was away."),
        ):
            yield CounterMetricFamily(f"hgad_edge_{name}", help_text, value=live.get(key, 0))
        reconnects = CounterMetricFamily(
            "hgad_edge_reconnects", "Reconnects to the source and to the inference server.", labels=["to"]
        )
        reconnects.add_metric(["source"], live.get("reconnects", 0))
        reconnects.add_metric(["server"], live.get("server_reconnects", 0))
        yield reconnects
        depth = GaugeMetricFamily("hgad_edge_sink_queue_depth", "Decisions waiting for a sink.", labels=["sink"])
        for sink, n in sorted(live.get("queue_depths", {}).items()):
            depth.add_metric([sink], n)
        yield depth
        threshold = GaugeMetricFamily("hgad_edge_threshold", "Score threshold in effect.", labels=["class"])
        for name, value in sorted(self.thresholds().items()):
            threshold.add_metric([name], value)
        yield threshold
        yield GaugeMetricFamily("hgad_edge_fps", "Frames a second since the run began.", value=live.get("fps", 0.0))
        run = self.state.run
        if "run" in run:
            info = InfoMetricFamily("hgad_edge_run", "The run this station is doing.")
            labels = {"run": run["run"], "backend": run["backend"], "source": redact_url(run["source"])}
            info.add_metric([], labels)
            yield info


def exposition(
    state: LiveState, live: Callable[[], dict[str, Any]], thresholds: Callable[[], dict]
) -> tuple[bytes, str]:
    """(body, content type) of one scrape."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(state, live, thresholds))
    return generate_latest(registry), CONTENT_TYPE_LATEST
