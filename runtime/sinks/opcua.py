"""OPC UA sink (asyncua, extra `[line]`): the station writes each decision into variables of an OPC UA
server (the PLC's, or the line's gateway) that the PLC reads.

    opc.tcp://plc:4840/Station1?ns=2       writes ns=2;s=Station1.Decision, ...Score, ...Counter

Variables, as string NodeIds `ns=<ns>;s=<prefix>.<Name>` (prefix: the URL's path, default "hgad"):

    Decision          "PASS" / "FAIL"                 Class      the class name
    Fail              true for FAIL                   Score      the anomaly score
    ScoreNormalized   0..1, 0.5 at the threshold      Message    the whole JSON message
    Counter           +1 per decision (written last: when it changes, the others belong to it)

The server defines the variables (and their data types: each value is converted to the type the
server declares); the sink writes those it finds, and refuses to start when it finds none of them
or not Counter. The counter continues from the value the server holds, so it keeps counting across
station restarts. Decisions are written one after another, in order; a PLC that must see every one
reads on each Counter change, or subscribes. Options: ns (default 2), timeout (s, default 5), queue=,
flush=. User and password: the URL's, else HGAD_EDGE_OPCUA_USER / HGAD_EDGE_OPCUA_PASSWORD.
"""

from __future__ import annotations

import json
from typing import Any

from hgad_edge.runtime.sinks.base import Sink, SinkDown, SinkError, SinkURL, import_client

__all__ = ["VARIABLES", "OpcUaSink"]

# variable name -> how its value comes from a message
VARIABLES = {
    "Decision": lambda m, text: m["decision"],
    "Fail": lambda m, text: m["decision"] == "FAIL",
    "Score": lambda m, text: m["score"],
    "ScoreNormalized": lambda m, text: m["score_normalized"],
    "Class": lambda m, text: m["class"],
    "Message": lambda m, text: text,
}
COUNTER = "Counter"


class OpcUaSink(Sink):
    schemes = ("opc.tcp",)
    kind = "OPCUA"
    default_ports = {"opc.tcp": 4840}
    params = ("ns", "timeout")

    def __init__(self, url: SinkURL) -> None:
        super().__init__(url)
        self.host, self.port = self.host_port
        self.ns = self.int_param("ns", 2, 0)
        self.timeout_s = self.float_param("timeout", 5.0, 0.1)
        self.prefix = url.path.strip("/") or "hgad"
        self._client = None
        self._nodes: dict[str, tuple[Any, Any]] = {}  # name -> (node, VariantType)
        self._counter = 0

    def node_id(self, name: str) -> str:
        return f"ns={self.ns};s={self.prefix}.{name}"

    def connect(self) -> None:
        sync = import_client("asyncua.sync", "OPC UA")
        ua = import_client("asyncua.ua", "OPC UA")
        client = sync.Client(
            f"opc.tcp://{self.url.netloc}", timeout=self.timeout_s, sync_wrapper_timeout=self.timeout_s * 2
        )
        user, password = self.credentials()
        if user is not None:
            client.aio_obj.set_user(user)
            client.aio_obj.set_password(password or "")
        try:
            client.connect()
        except ua.UaStatusCodeError as err:  # the server answered and refused (user, password, policy)
            client.disconnect()
            raise SinkError(f"sink {self.name}: the server refused the session: {err}") from err
        except Exception as err:  # OSError, TimeoutError, asyncio errors: the server is not there
            client.tloop.stop()
            raise SinkDown(
                f"cannot reach the OPC UA server at {self.host}:{self.port}: {err or type(err).__name__}"
            ) from err
        try:
            self._nodes = self._find_nodes(client, ua)
            self._counter = int(self._nodes[COUNTER][0].read_value() or 0)
        except SinkError:
            client.disconnect()
            raise
        except Exception as err:
            client.disconnect()
            raise SinkDown(f"OPC UA server at {self.host}:{self.port}: {err or type(err).__name__}") from err
        self._client = client

    def _find_nodes(self, client: Any, ua: Any) -> dict[str, tuple[Any, Any]]:
        found = {}
        for name in (*VARIABLES, COUNTER):
            node = client.get_node(self.node_id(name))
            try:
                found[name] = (node, node.read_data_type_as_variant_type())
            except ua.UaStatusCodeError:
                continue  # not defined on this server: not written
        if COUNTER not in found:
            wanted = ", ".join(self.node_id(n) for n in (*VARIABLES, COUNTER))
            raise SinkError(f"sink {self.name}: the server has no {self.node_id(COUNTER)}; define (some of) {wanted}")
        return found

    def send(self, payloads: list[str]) -> int:
        ua = import_client("asyncua.ua", "OPC UA")
        if self._client is None:
            self.connect()
        for done, payload in enumerate(payloads):
            message = json.loads(payload)
            data = [(name, fill(message, payload)) for name, fill in VARIABLES.items() if name in self._nodes]
            try:
                self._write(ua, data)
                self._write(ua, [(COUNTER, self._counter + 1)])
            except Exception as err:
                self._drop_client()
                raise SinkDown(f"OPC UA server at {self.host}:{self.port}: {err or type(err).__name__}", done) from err
            self._counter += 1
        return len(payloads)

    def _write(self, ua: Any, values: list[tuple[str, Any]]) -> None:
        nodes = [self._nodes[name][0] for name, _ in values]
        variants = [ua.Variant(_cast(value, self._nodes[name][1], ua), self._nodes[name][1]) for name, value in values]
        self._client.write_values(nodes, [ua.DataValue(v) for v in variants])

    def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.disconnect()
            except Exception:
                client.tloop.stop()

    def close(self) -> None:
        self._drop_client()


def _cast(value: Any, vtype: Any, ua: Any) -> Any:
    """A message value as the server's declared type (a PLC may declare Score as Float, Counter as UInt32)."""
    if vtype == ua.VariantType.Boolean:
        return bool(value)
    if vtype in (ua.VariantType.Float, ua.VariantType.Double):
        return float(value)
    if vtype.name.startswith(("Int", "UInt", "Byte", "SByte")):
        return int(value)
    return value if isinstance(value, str) else json.dumps(value)
