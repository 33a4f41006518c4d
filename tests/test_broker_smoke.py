"""The test broker and the MQTT client the agent builds on: a QoS 1 round trip over MQTT v5.

The sync and rollout features build on these two parts; this pins that both work here
(paho-mqtt 2.x callback API, Debian's Mosquitto started on a free loopback port).
"""

from __future__ import annotations

import threading

import paho.mqtt.client as mqtt
import pytest

pytestmark = pytest.mark.integration


def test_qos1_round_trip_through_a_real_mosquitto(mosquitto: tuple[str, int]) -> None:
    host, port = mosquitto
    got: list[bytes] = []
    subscribed = threading.Event()
    received = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="smoke", protocol=mqtt.MQTTv5)

    def on_connect(c, _userdata, _flags, reason_code, _props) -> None:
        assert not reason_code.is_failure
        c.subscribe("edge/v1/dev-1/#", qos=1)

    def on_subscribe(_c, _userdata, _mid, _codes, _props) -> None:
        subscribed.set()

    def on_message(_c, _userdata, msg) -> None:
        got.append(msg.payload)
        received.set()

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    client.connect(host, port)
    client.loop_start()
    try:
        assert subscribed.wait(5)
        info = client.publish("edge/v1/dev-1/status", b'{"v":1}', qos=1)
        info.wait_for_publish(5)
        assert info.is_published()
        assert received.wait(5)
        assert got == [b'{"v":1}']
    finally:
        client.loop_stop()
        client.disconnect()
