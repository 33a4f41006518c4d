"""The one module that imports paho-mqtt (2.x callback API): a connection to the broker that keeps
itself up.

MQTT v5 by default (3.1.1 for brokers that speak nothing else), client id = device id, optional TLS
and user name/password, a Last Will, and reconnects with jittered exponential backoff. Subscriptions
are remembered and renewed on every connect. Callbacks run on the network thread and only hand off:
``on_message(topic, payload)`` must enqueue and return.

paho keeps its session in memory only, so it is never the durable outbox: the SQLite buffer is, and a
record leaves it only when the cloud acknowledges it (``../shared/DESIGN.md``). paho's own queue is
bounded (``max_queued``) so an offline device cannot grow it without limit.
"""

from __future__ import annotations

import contextlib
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_runtime.core.backoff import Backoff
from edge_runtime.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BrokerConfig:
    host: str
    port: int = 1883
    client_id: str = ""
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    protocol: int = 5  # 5 or 311
    keepalive: int = 30
    session_expiry_s: int = 3600  # MQTT 5: the broker keeps our subscriptions (and QoS 1 commands) this long
    max_queued: int = 1000

    @classmethod
    def from_url(cls, url: str, client_id: str, **kw: Any) -> BrokerConfig:
        """``mqtt://[user:pass@]host[:1883]``, ``mqtts://...`` (TLS, port 8883), ``mqtt311://`` for 3.1.1."""
        u = urlsplit(url)
        schemes = {"mqtt": (False, 5, 1883), "mqtts": (True, 5, 8883), "mqtt311": (False, 311, 1883),
                   "mqtts311": (True, 311, 8883), "tcp": (False, 5, 1883), "ssl": (True, 5, 8883)}
        if u.scheme not in schemes or not u.hostname:
            raise ConfigError(f"broker URL must look like mqtt://host:1883 or mqtts://host:8883, got {url!r}")
        tls, proto, port = schemes[u.scheme]
        return cls(host=u.hostname, port=u.port or port, client_id=client_id,
                   username=unquote(u.username) if u.username else None,
                   password=unquote(u.password) if u.password else None, tls=tls or kw.pop("tls", False),
                   protocol=proto, **kw)


@dataclass
class TransportStats:
    connects: int = 0
    disconnects: int = 0
    published: int = 0
    publish_refused: dict[str, int] = field(default_factory=dict)  # broker reason -> count (MQTT 5)
    received: int = 0
    callback_errors: int = 0


class MqttTransport:
    """A self-reconnecting MQTT connection. ``publish`` never blocks and never raises on a dead link:
    it returns False and the caller (the sync) keeps the record in its buffer."""

    def __init__(self, cfg: BrokerConfig, *, on_message: Callable[[str, bytes], None] | None = None,
                 on_connection_change: Callable[[bool], None] | None = None,
                 will: tuple[str, bytes, int, bool] | Callable[[], tuple[str, bytes, int, bool]] | None = None,
                 on_publish_result: Callable[[int, str | None], None] | None = None,
                 backoff: Backoff | None = None) -> None:
        self.cfg = cfg
        self.stats = TransportStats()
        self._on_message = on_message
        self._on_change = on_connection_change
        self._on_publish_result = on_publish_result
        self._subs: dict[str, int] = {}
        self._subs_lock = threading.Lock()  # subscribe/unsubscribe from any thread vs renewal on connect
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._backoff = backoff or Backoff(min_s=0.5, max_s=30.0, rng=random.Random())
        v5 = cfg.protocol == 5
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cfg.client_id,
                                   protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                                   clean_session=None if v5 else False, reconnect_on_failure=False)
        self._client.max_queued_messages_set(cfg.max_queued)
        if cfg.username:
            self._client.username_pw_set(cfg.username, cfg.password)
        if cfg.tls:
            self._client.tls_set(ca_certs=cfg.ca_file, certfile=cfg.cert_file, keyfile=cfg.key_file,
                                 cert_reqs=ssl.CERT_REQUIRED)
        # A callable will is asked again before every connect (the will can then name the connection).
        self._will = will if callable(will) else None
        if will is not None and not callable(will):
            topic, payload, qos, retain = will
            self._client.will_set(topic, payload, qos=qos, retain=retain)
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_message = self._handle_message
        self._client.on_publish = self._handle_publish
        self._client.on_subscribe = self._handle_subscribe

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("transport already started")
        self._thread = threading.Thread(target=self._run, name=f"mqtt-{self.cfg.client_id}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (no Last Will) and stop the network thread."""
        self._stop.set()
        with contextlib.suppress(Exception):
            self._client.disconnect()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                if self._will is not None:
                    topic, payload, qos, retain = self._will()
                    self._client.will_set(topic, payload, qos=qos, retain=retain)
                props = None
                if self.cfg.protocol == 5:
                    props = Properties(PacketTypes.CONNECT)
                    props.SessionExpiryInterval = self.cfg.session_expiry_s
                self._client.connect(self.cfg.host, self.cfg.port, self.cfg.keepalive,
                                     clean_start=False if self.cfg.protocol == 5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                                     properties=props)
                self._client.loop_forever(retry_first_connection=False)
            except (OSError, ssl.SSLError, ValueError) as e:
                log.warning("broker %s:%d unreachable: %s", self.cfg.host, self.cfg.port, e)
            self._set_connected(False)
            if self._stop.is_set():
                break
            if time.monotonic() - started > 60:
                self._backoff.reset()  # the connection held: start the backoff over
            delay = self._backoff.next_delay()
            log.info("reconnecting to %s:%d in %.1f s", self.cfg.host, self.cfg.port, delay)
            self._stop.wait(delay)

    def _set_connected(self, up: bool) -> None:
        if up == self._connected.is_set():
            return
        if up:
            self._connected.set()
        else:
            self._connected.clear()
        if self._on_change is not None:
            try:
                self._on_change(up)
            except Exception:
                self.stats.callback_errors += 1
                log.exception("connection callback failed")

    # -- paho callbacks (network thread): hand off only ---------------------------------------

    def _handle_connect(self, client: Any, _userdata: Any, flags: Any, reason_code: Any, _props: Any) -> None:
        if reason_code.is_failure:
            log.error("broker refused the connection: %s", reason_code)
            return
        self.stats.connects += 1
        log.info("connected to %s:%d as %s (session present: %s)", self.cfg.host, self.cfg.port,
                 self.cfg.client_id, getattr(flags, "session_present", None))
        with self._subs_lock:
            subs = list(self._subs.items())
        for topic, qos in subs:
            client.subscribe(topic, qos=qos)
        self._set_connected(True)

    def _handle_disconnect(self, _client: Any, _userdata: Any, _flags: Any, reason_code: Any, _props: Any) -> None:
        self.stats.disconnects += 1
        if not self._stop.is_set():
            log.warning("disconnected from %s:%d: %s", self.cfg.host, self.cfg.port, reason_code)
        self._set_connected(False)

    def _handle_message(self, _client: Any, _userdata: Any, msg: Any) -> None:
        self.stats.received += 1
        if self._on_message is None:
            return
        try:
            self._on_message(msg.topic, bytes(msg.payload))
        except Exception:
            self.stats.callback_errors += 1
            log.exception("message callback failed for %s", msg.topic)

    def _handle_publish(self, _client: Any, _userdata: Any, mid: int, reason_code: Any, _props: Any) -> None:
        refused = None
        if reason_code is not None and getattr(reason_code, "is_failure", False):
            refused = str(reason_code)
            self.stats.publish_refused[refused] = self.stats.publish_refused.get(refused, 0) + 1
            log.warning("broker refused publish %d: %s", mid, refused)
        if self._on_publish_result is not None:
            self._on_publish_result(mid, refused)

    def _handle_subscribe(self, _client: Any, _userdata: Any, mid: int, codes: Any, _props: Any) -> None:
        for rc in codes or []:
            if getattr(rc, "is_failure", False):
                log.error("broker refused subscription %d: %s", mid, rc)

    # -- API ----------------------------------------------------------------------------------

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Remembered and renewed on every connect. Any thread."""
        with self._subs_lock:
            self._subs[topic] = qos
        if self.connected:
            self._client.subscribe(topic, qos=qos)

    def unsubscribe(self, topic: str) -> None:
        """Forget a subscription (not renewed on reconnect) and end it now when connected. Any thread."""
        with self._subs_lock:
            known = self._subs.pop(topic, None) is not None
        if known and self.connected:
            self._client.unsubscribe(topic)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int | None:
        """Hand a message to the client; its message id, or None when not connected (nothing queued)."""
        if not self.connected:
            return None
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return None
        self.stats.published += 1
        return info.mid
