"""MQTT sink (paho-mqtt, extra `[line]`): each decision published to one topic, QoS 1 by default.

    mqtt://broker:1883/plant/line1                 decisions on plant/line1, status on plant/line1/status
    mqtts://user:pw@broker:8883/line1?ca=ca.pem    TLS (system CAs, or ca=; cert= and key= for client certs)

Options: qos (0, 1, 2; default 1), status (the status topic), client_id, keepalive (s), timeout (s: how
long a batch may wait for the broker's acknowledgements), ca, cert, key, and the queue's queue= and
flush=. User and password: the URL's, else HGAD_EDGE_MQTT_USER / HGAD_EDGE_MQTT_PASSWORD.

The status topic holds a retained "online" while the station is connected; the broker publishes the
retained last will "offline" when the connection dies, and a clean close publishes "offline" itself,
so a dashboard always knows whether the station is there.

A batch counts as delivered only once the broker acknowledged each message (QoS 1: PUBACK; QoS 0:
written to the socket). A batch that is not acknowledged within `timeout` (the broker went away)
counts up to its last acknowledged message; the client is dropped and a fresh one connects for the
next attempt, which re-publishes from the first unacknowledged message, in order. Whether a message
the broker queued for an offline subscriber survives a broker restart is the broker's business:
Mosquitto keeps them only with `persistence true` (see docs/line.md).
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid

from hgad_edge.runtime.sinks.base import Sink, SinkDown, SinkError, SinkURL, import_client

__all__ = ["MqttSink"]


class MqttSink(Sink):
    schemes = ("mqtt", "mqtts")
    kind = "MQTT"
    default_ports = {"mqtt": 1883, "mqtts": 8883}
    params = ("qos", "status", "client_id", "keepalive", "timeout", "ca", "cert", "key")

    def __init__(self, url: SinkURL) -> None:
        super().__init__(url)
        self.topic = url.path.strip("/")
        if not self.topic or "+" in self.topic or "#" in url.raw.rsplit("@", 1)[-1]:
            raise SinkError(
                f"sink {self.name}: give the topic as the URL's path without wildcards, e.g. mqtt://broker/line1"
            )
        self.host, self.port = self.host_port
        self.qos = self.int_param("qos", 1, 0, 2)
        self.status_topic = url.params.get("status") or f"{self.topic}/status"
        self.keepalive = self.int_param("keepalive", 30, 5)
        self.timeout_s = self.float_param("timeout", 5.0, 0.1)
        self.tls = url.scheme == "mqtts"
        self.ca, self.cert, self.key_file = self.path_param("ca"), self.path_param("cert"), self.path_param("key")
        if (self.ca or self.cert) and not self.tls:
            raise SinkError(f"sink {self.name}: ca/cert/key need TLS: use mqtts://")
        host = socket.gethostname()
        self.client_id = url.params.get("client_id") or f"hgad-edge-{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._client = None
        self._connack = threading.Event()
        self._refused: str | None = None

    def connect(self) -> None:
        mqtt = import_client("paho.mqtt.client", "MQTT")
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv311)
        user, password = self.credentials()
        if user is not None:
            client.username_pw_set(user, password)
        if self.tls:
            try:
                client.tls_set(ca_certs=self.ca, certfile=self.cert, keyfile=self.key_file)
            except (OSError, ValueError) as err:
                raise SinkError(f"sink {self.name}: TLS setup failed: {err}") from err
        client.will_set(self.status_topic, "offline", qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        self._connack.clear()
        self._refused = None
        try:
            client.connect(self.host, self.port, keepalive=self.keepalive)
        except (OSError, ValueError) as err:
            raise SinkDown(f"cannot reach the broker at {self.host}:{self.port}: {err}") from err
        client.loop_start()
        if not self._connack.wait(self.timeout_s) or self._refused is not None:
            client.loop_stop()
            client.disconnect()
            if self._refused is not None:  # bad user/password or client id: not an outage
                raise SinkError(f"sink {self.name}: the broker refused the connection: {self._refused}")
            raise SinkDown(f"the broker at {self.host}:{self.port} did not answer within {self.timeout_s} s")
        client.publish(self.status_topic, "online", qos=1, retain=True)
        self._client = client

    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if reason_code.is_failure:
            self._refused = str(reason_code)
        self._connack.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties=None) -> None:
        self._connack.clear()

    def send(self, payloads: list[str]) -> int:
        if self._client is None or not self._client.is_connected():
            self._drop_client()
            self.connect()
        infos = [self._client.publish(self.topic, payload, qos=self.qos) for payload in payloads]
        deadline = time.monotonic() + self.timeout_s
        delivered = 0
        for info in infos:
            try:
                info.wait_for_publish(max(deadline - time.monotonic(), 0.0))
            except (RuntimeError, ValueError):  # not queued: the connection is gone
                break
            if not info.is_published():
                break
            delivered += 1
        if delivered < len(payloads):
            self._drop_client()
            raise SinkDown(
                f"the broker at {self.host}:{self.port} did not acknowledge within {self.timeout_s} s", delivered
            )
        return delivered

    def _drop_client(self) -> None:
        """Forget a broken connection (and paho's own copies of unacknowledged messages: ours are on disk)."""
        client, self._client = self._client, None
        if client is not None:
            client.loop_stop()
            try:
                client.socket() and client.socket().close()
            except OSError:
                pass

    def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        if client.is_connected():
            client.publish(self.status_topic, "offline", qos=1, retain=True).wait_for_publish(self.timeout_s)
            client.disconnect()
        client.loop_stop()
