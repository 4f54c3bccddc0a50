"""Decisions to the line: sinks (JSON lines, MQTT, OPC UA, webhooks), each behind a bounded disk queue,
and the inspection history (hgad_edge.runtime.history). Torch-free; the client libraries (paho-mqtt,
asyncua, SQLAlchemy + psycopg) come with the extra `[line]` and are imported only when a sink of
their kind connects.

    registry.py   SINKS: URL scheme -> sink class; parse_sink(url)
    message.py    the one message schema (versioned, FIELDS documents it), RunContext
    spool.py      DiskQueue: the bounded on-disk queue in front of each sink
    delivery.py   Delivery: a sink's spooler and sender threads, retries, counts
    publisher.py  Publisher: one run's decisions to every sink and the history
    jsonl.py, mqtt.py, opcua.py, webhook.py: one module per kind

Python API (hgad-edge run does the same with --sink URL ... --history DB):

    from hgad_edge.runtime import Detector
    from hgad_edge.runtime.sinks import Publisher

    with Detector("bundle/") as det, Publisher(["mqtt://broker:1883/line1"], history="runs.db").open_for(det) as line:
        result = det.infer(frame)
        line.publish_result(result, frame=0, source="cam0")
    line.counts   # {"sinks": {"mqtt://broker:1883/line1": {"sent": 1, "queued": 0, "dropped": 0, ...}}, ...}

or `hgad_edge.runtime.app.run_app(bundle, source, sinks=[...], history="runs.db")`.
"""

from hgad_edge.runtime.sinks.base import Sink, SinkDown, SinkError, SinkRejected, SinkURL
from hgad_edge.runtime.sinks.message import FIELDS, SCHEMA, SCHEMA_VERSION, RunContext, decision_message
from hgad_edge.runtime.sinks.publisher import Publisher, new_run_id
from hgad_edge.runtime.sinks.registry import SINKS, parse_sink
from hgad_edge.runtime.sinks.spool import DiskQueue, default_spool

__all__ = [
    "FIELDS",
    "SCHEMA",
    "SCHEMA_VERSION",
    "SINKS",
    "DiskQueue",
    "Publisher",
    "RunContext",
    "Sink",
    "SinkDown",
    "SinkError",
    "SinkRejected",
    "SinkURL",
    "decision_message",
    "default_spool",
    "new_run_id",
    "parse_sink",
]
