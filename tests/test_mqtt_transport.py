"""The MQTT transport and the shipped ACL template, against a real Mosquitto on MQTT 5.

Access control is asserted by the broker's reason codes (0x87 Not authorized), which only MQTT 5
reports: on 3.1.1 a denied publish is still acknowledged (../shared/DESIGN.md)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edge_runtime.adapters.mqtt_transport import BrokerConfig, MqttTransport
from edge_runtime.core.backoff import Backoff
from tests.conftest import ROOT

pytestmark = pytest.mark.integration

NOT_AUTHORIZED = 0x87
ACCEPTED = {0x00, 0x10}  # success, and success with "no matching subscribers"
USERS = {"dev-a": "pw-a", "dev-b": "pw-b", "cloud-sync": "pw-cloud"}


@pytest.fixture
def secured(broker_factory, tmp_path: Path):
    """A broker with passwords, user name bound to client id, and the ACL template from devices/."""
    pw = tmp_path / "passwd"
    pw.write_text("")
    for user, password in USERS.items():
        subprocess.run(["mosquitto_passwd", "-b", str(pw), user, password], check=True, capture_output=True)
    acl = ROOT / "devices" / "mosquitto" / "edge-runtime.acl"
    return broker_factory(f"allow_anonymous false\npassword_file {pw}\nuse_username_as_clientid true\n"
                          f"acl_file {acl}\n")


class V5Client:
    """A bare paho client that records reason codes, to look at what the broker answers."""

    def __init__(self, broker, user: str, client_id: str | None = None) -> None:
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or user, protocol=mqtt.MQTTv5)
        self.c.username_pw_set(user, USERS[user])
        self.puback: dict[int, int] = {}
        self.suback: dict[int, list[int]] = {}
        self.messages: list[tuple[str, bytes]] = []
        self.events = threading.Condition()
        self.c.on_publish = self._pub
        self.c.on_subscribe = self._sub
        self.c.on_message = self._msg
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()

    def _pub(self, _c, _u, mid, rc, _p) -> None:
        with self.events:
            self.puback[mid] = rc.value
            self.events.notify_all()

    def _sub(self, _c, _u, mid, codes, _p) -> None:
        with self.events:
            self.suback[mid] = [c.value for c in codes]
            self.events.notify_all()

    def _msg(self, _c, _u, msg) -> None:
        with self.events:
            self.messages.append((msg.topic, bytes(msg.payload)))
            self.events.notify_all()

    def publish(self, topic: str) -> int:
        mid = self.c.publish(topic, b"x", qos=1).mid
        with self.events:
            assert self.events.wait_for(lambda: mid in self.puback, 5), f"no PUBACK for {topic}"
            return self.puback[mid]

    def subscribe(self, topic: str) -> int:
        _, mid = self.c.subscribe(topic, qos=1)
        with self.events:
            assert self.events.wait_for(lambda: mid in self.suback, 5), f"no SUBACK for {topic}"
            return self.suback[mid][0]

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def test_acl_template_keeps_devices_to_their_own_topics(secured) -> None:
    cloud = V5Client(secured, "cloud-sync")
    a = V5Client(secured, "dev-a")
    b = V5Client(secured, "dev-b")
    try:
        assert cloud.subscribe("$share/ingest/edge/v1/+/predictions") == 1
        assert a.publish("edge/v1/dev-a/predictions") in ACCEPTED
        assert a.publish("edge/v1/dev-b/predictions") == NOT_AUTHORIZED
        assert a.publish("edge/v1/dev-b/status") == NOT_AUTHORIZED
        assert a.publish("edge/v1/dev-a/cmd/ack") == NOT_AUTHORIZED  # devices cannot forge commands
        assert a.subscribe("edge/v1/dev-a/cmd/#") == 1
        # Mosquitto 2.0.11 grants these SUBACKs and enforces the ACL on delivery: A must receive none
        # of B's commands or predictions.
        a.subscribe("edge/v1/dev-b/cmd/#")
        a.subscribe("edge/v1/+/predictions")
        assert cloud.publish("edge/v1/dev-b/cmd/ack") in ACCEPTED
        assert b.publish("edge/v1/dev-b/predictions") in ACCEPTED
        assert cloud.publish("edge/v1/dev-a/cmd/ack") in ACCEPTED
        with a.events:
            assert a.events.wait_for(lambda: ("edge/v1/dev-a/cmd/ack", b"x") in a.messages, 5)
        time.sleep(0.3)
        assert [t for t, _ in a.messages] == ["edge/v1/dev-a/cmd/ack"]
        with cloud.events:
            assert cloud.events.wait_for(lambda: len(cloud.messages) >= 2, 5)
        # The cloud got A's and B's own predictions and nothing from the denied publishes.
        assert sorted(t for t, _ in cloud.messages) == ["edge/v1/dev-a/predictions", "edge/v1/dev-b/predictions"]
    finally:
        for c in (cloud, a, b):
            c.close()



def test_acl_template_lets_devices_read_bundles_but_not_write_them(secured) -> None:
    cloud = V5Client(secured, "cloud-sync")
    a = V5Client(secured, "dev-a")
    try:
        assert a.subscribe("edge/v1/bundles/cnn-3-0123456789ab/c/0") == 1
        assert a.subscribe("edge/v1/bundles/cnn-3-0123456789ab/manifest") == 1
        assert a.publish("edge/v1/bundles/cnn-3-0123456789ab/c/0") == NOT_AUTHORIZED
        assert a.publish("edge/v1/bundles/cnn-3-0123456789ab/manifest") == NOT_AUTHORIZED
        assert a.publish("edge/v1/bundles/other-1-0123456789ab/c/1") == NOT_AUTHORIZED
        assert cloud.publish("edge/v1/bundles/cnn-3-0123456789ab/c/0") in ACCEPTED
        with a.events:
            assert a.events.wait_for(lambda: ("edge/v1/bundles/cnn-3-0123456789ab/c/0", b"x") in a.messages, 5)
        time.sleep(0.3)
        assert [t for t, _ in a.messages] == ["edge/v1/bundles/cnn-3-0123456789ab/c/0"]  # not its own forgeries
    finally:
        for c in (cloud, a):
            c.close()

def test_a_device_cannot_claim_another_client_id(secured) -> None:
    # use_username_as_clientid: the broker replaces the claimed id with the user name.
    a = V5Client(secured, "dev-a", client_id="dev-b")
    try:
        assert a.publish("edge/v1/dev-b/status") == NOT_AUTHORIZED
        assert a.publish("edge/v1/dev-a/status") in ACCEPTED
    finally:
        a.close()


def test_transport_receives_renews_subscriptions_after_broker_restart(broker_factory) -> None:
    broker = broker_factory()
    got: list[tuple[str, bytes]] = []
    arrived = threading.Event()
    changes: list[bool] = []

    def on_message(topic: str, payload: bytes) -> None:
        got.append((topic, payload))
        arrived.set()

    wills: list[int] = []

    def will() -> tuple[str, bytes, int, bool]:  # asked before every connect: the will names the connection
        wills.append(len(wills) + 1)
        return "edge/v1/dev-1/status", f"will {len(wills)}".encode(), 1, True

    t = MqttTransport(BrokerConfig.from_url(broker.url, "dev-1"), on_message=on_message,
                      on_connection_change=changes.append, backoff=Backoff(min_s=0.1, max_s=0.5), will=will)
    t.subscribe("edge/v1/dev-1/cmd/#")
    t.start()
    try:
        assert t.wait_connected(5)
        sender = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="sender", protocol=mqtt.MQTTv5)
        sender.connect(broker.host, broker.port)
        sender.loop_start()
        time.sleep(0.3)
        sender.publish("edge/v1/dev-1/cmd/ack", b"1", qos=1).wait_for_publish(5)
        assert arrived.wait(5)
        sender.loop_stop()
        broker.restart()  # persistence off: the broker forgets every session
        deadline = time.monotonic() + 10
        while not (t.connected and changes.count(True) >= 2) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert changes[:3] == [True, False, True]
        assert len(wills) >= 2  # a fresh will for the new connection
        assert t.publish("edge/v1/dev-1/status", b"up") is not None
        arrived.clear()
        sender = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="sender2", protocol=mqtt.MQTTv5)
        sender.connect(broker.host, broker.port)
        sender.loop_start()
        time.sleep(0.3)
        sender.publish("edge/v1/dev-1/cmd/ack", b"2", qos=1).wait_for_publish(5)
        assert arrived.wait(5), "subscription not renewed after the broker restart"
        assert got[-1] == ("edge/v1/dev-1/cmd/ack", b"2")
        sender.loop_stop()
    finally:
        t.stop()
    assert t.stats.connects >= 2 and t.stats.disconnects >= 1


def test_publish_while_disconnected_returns_none_and_queues_nothing(broker_factory) -> None:
    broker = broker_factory()
    t = MqttTransport(BrokerConfig.from_url(broker.url, "dev-2"), backoff=Backoff(min_s=0.1, max_s=0.2))
    t.start()
    try:
        assert t.wait_connected(5)
        broker.stop()
        deadline = time.monotonic() + 5
        while t.connected and time.monotonic() < deadline:
            time.sleep(0.02)
        assert t.publish("edge/v1/dev-2/status", b"x") is None
    finally:
        t.stop()


def test_last_will_marks_a_killed_device_offline(broker_factory) -> None:
    broker = broker_factory()
    code = f"""
import time, sys
from edge_runtime.adapters.mqtt_transport import BrokerConfig, MqttTransport
t = MqttTransport(BrokerConfig.from_url("{broker.url}", "dev-3"),
                  will=("edge/v1/dev-3/status", b'{{"online": false}}', 1, True))
t.start()
assert t.wait_connected(5)
t.publish("edge/v1/dev-3/status", b'{{"online": true}}', qos=1, retain=True)
print("up", flush=True)
time.sleep(60)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
        time.sleep(0.3)
        proc.kill()
        proc.wait(5)
        seen: list[bytes] = []
        done = threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="watcher", protocol=mqtt.MQTTv5)

        def on_message(_c, _u, msg) -> None:
            seen.append(bytes(msg.payload))
            if b"false" in msg.payload:
                done.set()

        c.on_message = on_message
        c.on_connect = lambda cl, *_: cl.subscribe("edge/v1/dev-3/status", qos=1)
        c.connect(broker.host, broker.port)
        c.loop_start()
        assert done.wait(10), f"retained status after the kill: {seen}"
        c.loop_stop()
    finally:
        proc.kill()


def test_broker_urls() -> None:
    c = BrokerConfig.from_url("mqtts://dev%40x:s3cret@broker.example:9999", "dev-9")
    assert (c.host, c.port, c.tls, c.username, c.password, c.protocol) == ("broker.example", 9999, True, "dev@x",
                                                                         "s3cret", 5)
    assert BrokerConfig.from_url("mqtt311://h", "d").protocol == 311
    assert BrokerConfig.from_url("mqtt://h", "d").port == 1883
    with pytest.raises(Exception, match="broker URL"):
        BrokerConfig.from_url("http://h", "d")


def test_backoff_grows_with_jitter_and_resets() -> None:
    import random

    b = Backoff(min_s=1, max_s=8, jitter=0.5, rng=random.Random(1))
    delays = [b.next_delay() for _ in range(6)]
    for d, ceiling in zip(delays, [1, 2, 4, 8, 8, 8], strict=True):
        assert ceiling / 2 <= d <= ceiling
    b.reset()
    assert b.next_delay() <= 1
