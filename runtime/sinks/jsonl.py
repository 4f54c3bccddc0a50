"""JSON-lines sink: the decision messages, one per line, appended to a local file (or a FIFO or device).

    jsonl:decisions.jsonl          (relative to the working folder; any *.jsonl path works too)
    jsonl:///var/log/line1.jsonl

The same messages MQTT, OPC UA and webhooks get (not `--output`'s per-frame records), for a log
shipper or a nightly import. The writing is `--output`'s own (hgad_edge.runtime.outputs.JsonLines:
appended, one write per line, a FIFO or character device written through, a symlink's target written
to), so both kinds of file behave alike. A local file needs no disk queue in front of it: a failed
write (a full disk) is kept in memory and tried again, on a freshly opened file, like any outage.
"""

from __future__ import annotations

import json
from pathlib import Path

from hgad_edge.runtime.outputs import JsonLines, OutputError, check_output
from hgad_edge.runtime.sinks.base import Sink, SinkDown, SinkError, SinkURL

__all__ = ["JsonlSink"]


class JsonlSink(Sink):
    schemes = ("jsonl",)
    kind = "JSONL"
    spooled = False

    def __init__(self, url: SinkURL) -> None:
        super().__init__(url)
        _, _, rest = url.raw.partition(":")
        rest = rest.split("?", 1)[0]
        path = rest[2:] if rest.startswith("//") else rest  # jsonl:///abs (empty host) or jsonl:relative
        if not path:
            raise SinkError(f"sink {url.raw}: give a file, e.g. jsonl:decisions.jsonl or jsonl:///var/log/line1.jsonl")
        self.path = Path(path)
        try:
            check_output(self.path)
        except OutputError as err:
            raise SinkError(f"sink {self.name}: {err}") from err
        self._writer: JsonLines | None = None

    @property
    def name(self) -> str:
        return f"jsonl:{self.path}"

    def connect(self) -> None:
        try:
            self._writer = JsonLines(self.path)
        except OutputError as err:
            raise SinkDown(str(err)) from err

    def send(self, payloads: list[str]) -> int:
        if self._writer is None:
            self.connect()
        for done, payload in enumerate(payloads):
            try:
                self._writer.write(json.loads(payload))
            except OutputError as err:
                self.close()  # a writer that failed once writes no more: the next try opens the file again
                raise SinkDown(str(err), done) from err
        return len(payloads)

    def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.flush()
            finally:
                writer.close()
