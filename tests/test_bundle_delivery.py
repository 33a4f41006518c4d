"""Bundle delivery over MQTT: the chunk planner, the manifest message, the on-disk download, and the
cloud-to-devices transfer through a real Mosquitto (retained chunks, resume, tampering, full disk)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloud_sync.distribute import PublishWindow, build_manifest, publish_bundle, withdraw_bundle
from edge_runtime.adapters.bundle_download import BAD, DUPLICATE, STORED, BundleDownload, DownloadError
from edge_runtime.adapters.mqtt_transport import BrokerConfig, MqttTransport
from edge_runtime.core import protocol as p
from edge_runtime.core.backoff import Backoff
from edge_runtime.core.chunks import ChunkProgress, choose_chunk_size, chunk_count, plan_chunks
from edge_runtime.download import BundleFetcher

H = hashlib.sha256(b"x").hexdigest()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def random_file(path: Path, size: int, seed: int = 1) -> Path:
    """A file where only the bytes matter (publish_bundle is given name and version)."""
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def manifest_of(data: bytes, chunk_size: int, bundle_id: str = "blob-1-abc") -> p.BundleManifest:
    chunks = tuple(sha(data[i:i + chunk_size]) for i in range(0, len(data), chunk_size))
    return p.BundleManifest(bundle_id, "blob", "1", len(data), sha(data), chunk_size, chunks)


# -- pure: planner, progress, manifest, topics ---------------------------------------------------------

@given(st.integers(0, 10_000), st.integers(1, 3000))
def test_plan_covers_the_file_exactly_once(size: int, chunk_size: int) -> None:
    plan = plan_chunks(size, chunk_size)
    assert len(plan) == chunk_count(size, chunk_size) == -(-size // chunk_size)
    assert sum(c.length for c in plan) == size
    assert all(c.offset == c.index * chunk_size and 0 < c.length <= chunk_size for c in plan)


@given(st.integers(0, 300), st.data())
def test_progress_round_trips_and_lists_what_is_missing(count: int, data: st.DataObject) -> None:
    have = data.draw(st.sets(st.integers(0, max(0, count - 1)), max_size=count)) if count else set()
    prog = ChunkProgress(count)
    for i in have:
        assert prog.add(i)
        assert not prog.add(i)
    assert prog.done == len(have) and prog.complete == (len(have) == count)
    assert prog.missing() == [i for i in range(count) if i not in have]
    back = ChunkProgress.from_dict(json.loads(json.dumps(prog.to_dict())))
    assert back == prog and back.done == prog.done
    if have:
        i = min(have)
        assert back.discard(i) and not back.has(i) and not back.discard(i)


def test_progress_refuses_malformed_state() -> None:
    for bad in ({"count": 9, "bits": "ff"}, {"count": 3, "bits": "ff"}, {"count": -1, "bits": ""},
                {"count": 8, "bits": "zz"}, {"bits": "00"}, [1, 2]):
        with pytest.raises(ValueError):
            ChunkProgress.from_dict(bad)  # type: ignore[arg-type]
    with pytest.raises(IndexError):
        ChunkProgress(4).add(4)


def test_chunk_size_grows_only_when_the_manifest_would_not_fit() -> None:
    assert choose_chunk_size(5_000_000) == 65536
    assert choose_chunk_size(p.MAX_BUNDLE_BYTES) == 256 * 1024
    assert chunk_count(p.MAX_BUNDLE_BYTES, choose_chunk_size(p.MAX_BUNDLE_BYTES)) <= p.MAX_BUNDLE_CHUNKS
    with pytest.raises(ValueError, match="at most"):
        choose_chunk_size(p.MAX_BUNDLE_BYTES + 1)
    # The largest legal manifest still fits one message.
    biggest = p.BundleManifest("b", "n" * 128, "v" * 128, p.MAX_BUNDLE_CHUNKS * 1024, H, 1024,
                               (H,) * p.MAX_BUNDLE_CHUNKS)
    assert len(biggest.to_wire()) <= p.DEFAULT_MAX_BYTES


def test_bundle_topics_round_trip_and_refuse_anything_else() -> None:
    assert p.bundle_manifest_topic("cnn-3-0123456789ab") == "edge/v1/bundles/cnn-3-0123456789ab/manifest"
    assert p.bundle_chunk_topic("cnn-3-0123456789ab", 12) == "edge/v1/bundles/cnn-3-0123456789ab/c/12"
    assert p.bundle_subscription("b1") == "edge/v1/bundles/b1/#"
    assert p.bundle_subscription() == "edge/v1/bundles/+/manifest"
    assert p.parse_bundle_topic("edge/v1/bundles/b1/manifest") == ("b1", "manifest")
    assert p.parse_bundle_topic("edge/v1/bundles/b1/c/0") == ("b1", 0)
    for bad in ("edge/v1/bundles/b1/c/01", "edge/v1/bundles/b1/c/-1", "edge/v1/bundles/b1/c/3072",
                "edge/v1/bundles/b1/x/1", "edge/v1/bundles/b1", "edge/v1/bundles/+/manifest",
                "edge/v1/bundles/cmd/manifest", "edge/v2/bundles/b1/manifest", "edge/v1/dev-1/status", 7):
        with pytest.raises(p.ProtocolError) as e:
            p.parse_bundle_topic(bad)
        assert e.value.reason == "bad_topic"
    with pytest.raises(p.ProtocolError):
        p.bundle_chunk_topic("b/1", 0)
    assert p.bundle_id_for("cnn model", "1.4.0+build.7", H) == "cnn_model-1.4.0_build.7-" + H[:12]
    assert len(p.bundle_id_for("n" * 128, "v" * 128, H)) <= 64
    # Bundle topics never look like device topics.
    with pytest.raises(p.ProtocolError):
        p.parse_topic(p.bundle_manifest_topic("b1"))


def test_manifest_round_trips_and_rejects_inconsistent_values() -> None:
    data = os.urandom(5000)
    m = manifest_of(data, 1024)
    wire = m.to_wire()
    assert wire.startswith(b'{"v":1,"bundle_id":"blob-1-abc","name":"blob","version":"1","size":5000,')
    assert p.BundleManifest.from_wire(wire, m.topic) == m
    assert m.count == 5 and m.chunk_span(4) == (4096, 904)
    obj = json.loads(wire)

    def reason(**changes: Any) -> str:
        with pytest.raises(p.ProtocolError) as e:
            p.BundleManifest.from_wire(json.dumps({**obj, **changes}).encode(), m.topic)
        return e.value.reason

    assert reason(size=5000 + 1024) == "bad_value"          # 6 chunks needed, 5 listed
    assert reason(chunks=obj["chunks"][:-1]) == "bad_value"
    assert reason(chunks=[*obj["chunks"][:-1], "AB" * 32]) == "bad_value"   # upper-case hex
    assert reason(sha256=H[:-1]) == "bad_value"
    assert reason(chunk_size=100) == "bad_value"
    assert reason(chunk_size=p.MAX_CHUNK_BYTES + 1) == "bad_value"
    assert reason(size=0) == "bad_value"
    assert reason(size=p.MAX_BUNDLE_BYTES + 1) == "bad_value"
    assert reason(size="5000") == "bad_type"
    assert reason(v=2) == "wrong_version"
    assert reason(bundle_id="other-1") == "bad_value"       # the topic names another bundle
    with pytest.raises(p.ProtocolError) as e:
        p.BundleManifest.from_wire(wire[: len(wire) // 2], m.topic)
    assert e.value.reason == "bad_json" and e.value.topic == m.topic
    with pytest.raises(p.ProtocolError) as e:
        p.BundleManifest.from_wire(b"", m.topic)
    assert e.value.reason == "empty"
    with pytest.raises(p.ProtocolError) as e:
        p.BundleManifest.from_wire(wire, m.chunk_topic(0))
    assert e.value.reason == "bad_topic"


# -- the on-disk download ----------------------------------------------------------------------------

def test_download_stores_verified_chunks_and_finishes(tmp_path: Path) -> None:
    data = os.urandom(10_000)
    m = manifest_of(data, 1024)
    d = BundleDownload(m, tmp_path)
    assert d.part_path.stat().st_size == m.size
    for i in reversed(range(m.count)):
        off, n = m.chunk_span(i)
        if i == 3:
            assert d.add_chunk(i, b"x" * n) == BAD
            assert d.add_chunk(i, data[off:off + n - 1]) == BAD
        assert d.add_chunk(i, data[off:off + n]) == STORED
    assert d.add_chunk(0, data[:1024]) == DUPLICATE
    assert d.stats.bad_chunks == 2 and not d.stats.bad
    assert d.complete
    path = d.finish()
    assert path == tmp_path / "blob-1-abc.tar" and path.read_bytes() == data
    assert not d.part_path.exists() and not d.progress_path.exists()
    # Opening it again finds the finished file.
    again = BundleDownload(m, tmp_path)
    assert again.finished == path and again.complete


def test_download_resumes_from_persisted_progress_and_starts_over_when_it_must(tmp_path: Path) -> None:
    data = os.urandom(20 * 1024)
    m = manifest_of(data, 1024)
    d = BundleDownload(m, tmp_path, persist_every_bytes=4096)
    for i in range(10):
        d.add_chunk(i, data[i * 1024:(i + 1) * 1024])
    # A crash: no close(). What was persisted (every 4 KiB, after an fsync of the .part) survives.
    crashed = BundleDownload(m, tmp_path)
    assert crashed.stats.resumed == 8 and crashed.missing() == list(range(8, 20))
    crashed.close()
    d.close()  # the clean way persists everything
    resumed = BundleDownload(m, tmp_path)
    assert resumed.stats.resumed == 10 and resumed.missing() == list(range(10, 20))
    resumed.close()
    # A .part of the wrong size, or none, or progress for another manifest: start over.
    os.truncate(resumed.part_path, 100)
    fresh = BundleDownload(m, tmp_path)
    assert fresh.stats.resumed == 0 and "expected" in fresh.stats.restarted
    fresh.close()
    fresh.part_path.unlink()
    assert "missing" in BundleDownload(m, tmp_path).stats.restarted
    other = manifest_of(data, 2048)
    assert "another manifest" in BundleDownload(other, tmp_path).stats.restarted


def test_download_finds_chunks_corrupted_on_disk(tmp_path: Path) -> None:
    data = os.urandom(8192)
    m = manifest_of(data, 1024)
    d = BundleDownload(m, tmp_path)
    for i in range(m.count):
        d.add_chunk(i, data[i * 1024:(i + 1) * 1024])
    with d.part_path.open("r+b") as f:  # the SD card lost a block
        f.seek(5000)
        f.write(b"\0" * 10)
    with pytest.raises(DownloadError) as e:
        d.finish()
    assert e.value.reason == "corrupt_chunks" and e.value.chunks == (4,)
    assert d.missing() == [4]
    assert d.add_chunk(4, data[4096:5120]) == STORED
    assert d.finish().read_bytes() == data


def test_publishing_needs_a_name_and_version(tmp_path: Path) -> None:
    from cloud_sync.distribute import PublishError

    src = random_file(tmp_path / "blob.bin", 5000)
    with pytest.raises(PublishError) as e:
        build_manifest(src)
    assert e.value.reason == "bad_bundle" and "pass name= and version=" in str(e.value)
    m = build_manifest(src, name="blob", version="7", chunk_size=1024)
    assert m.bundle_id == f"blob-7-{sha(src.read_bytes())[:12]}" and m.count == 5
    expected = manifest_of(src.read_bytes(), 1024)
    assert (m.sha256, m.chunks, m.size) == (expected.sha256, expected.chunks, 5000)


def test_not_enough_disk_is_a_clear_error(tmp_path: Path) -> None:
    m = manifest_of(os.urandom(4096), 1024)
    with pytest.raises(DownloadError) as e:
        BundleDownload(m, tmp_path, free_bytes=lambda _p: 1000)
    assert e.value.reason == "no_space"
    assert "need 4096 bytes" in str(e.value) and "1000 available" in str(e.value)
    assert not list(tmp_path.iterdir())


# -- the fetcher's rules, against an in-memory broker that keeps retained messages --------------------

class FakeBroker:
    """Retained messages, exact-topic subscriptions, and deliveries queued until pump()."""

    def __init__(self) -> None:
        self.retained: dict[str, bytes] = {}
        self.subs: set[str] = set()
        self.queue: deque[tuple[str, bytes]] = deque()
        self.fetcher: BundleFetcher | None = None
        self.subscribes = 0

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self.subs.add(topic)
        self.subscribes += 1
        if topic in self.retained:
            self.queue.append((topic, self.retained[topic]))

    def unsubscribe(self, topic: str) -> None:
        self.subs.discard(topic)

    def publish(self, topic: str, payload: bytes, retain: bool = True) -> None:
        if retain:
            self.retained[topic] = payload
        if topic in self.subs:
            self.queue.append((topic, payload))

    def pump(self, limit: int = 100_000) -> None:
        assert self.fetcher is not None
        while self.queue and limit:
            self.fetcher.on_message(*self.queue.popleft())
            limit -= 1


def fake_fetch(tmp_path: Path, data: bytes, chunk_size: int, **kw: Any) -> tuple[FakeBroker, p.BundleManifest,
                                                                                     BundleFetcher, list[Any]]:
    m = manifest_of(data, chunk_size)
    broker = FakeBroker()
    for i in range(m.count):
        broker.retained[m.chunk_topic(i)] = data[i * chunk_size:(i + 1) * chunk_size]
    events: list[Any] = []
    f = BundleFetcher(broker, m.bundle_id, tmp_path / "dl", on_done=events.append, on_failed=events.append, **kw)
    broker.fetcher = f
    f.start()
    return broker, m, f, events


def test_fetcher_asks_for_a_window_of_exact_chunk_topics(tmp_path: Path) -> None:
    data = os.urandom(50 * 1024)
    broker, m, f, events = fake_fetch(tmp_path, data, 1024, window=4)
    broker.publish(m.topic, m.to_wire())
    broker.pump(limit=1)
    assert len([s for s in broker.subs if "/c/" in s]) == 4
    broker.pump(limit=3)
    assert len([s for s in broker.subs if "/c/" in s]) == 4
    broker.pump()
    assert events == [tmp_path / "dl" / f"{m.bundle_id}.tar"] and events[0].read_bytes() == data
    assert broker.subs == set()  # manifest and every chunk unsubscribed
    assert f.stats.stored == m.count and f.stats.received_indices == list(range(m.count))


def test_fetcher_retries_a_bad_live_chunk_once_then_fails_naming_it(tmp_path: Path) -> None:
    data = os.urandom(8 * 1024)
    broker, m, f, events = fake_fetch(tmp_path, data, 1024, window=8)
    broker.publish(m.topic, m.to_wire())
    broker.pump(limit=1)
    broker.queue.appendleft((m.chunk_topic(2), b"garbage"))  # live garbage first; the retained copy is good
    broker.pump()
    assert f.stats.bad_chunks == 1 and isinstance(events[0], Path)

    broker2, m2, f2, events2 = fake_fetch(tmp_path / "b", data, 1024, window=8)
    broker2.retained[m2.chunk_topic(5)] = b"tampered" * 128
    broker2.publish(m2.topic, m2.to_wire())
    broker2.pump()
    (err,) = events2
    assert isinstance(err, DownloadError) and err.reason == "bad_chunks" and err.chunks == (5,)
    assert "chunk 5" in str(err) and f2.stats.bad_chunks == 2
    assert not (tmp_path / "b" / "dl" / f"{m2.bundle_id}.tar").exists()


def test_fetcher_poll_asks_again_then_gives_up(tmp_path: Path) -> None:
    data = os.urandom(4 * 1024)
    now = [0.0]
    broker, m, f, events = fake_fetch(tmp_path, data, 1024, window=2, stall_s=10, max_stalls=2,
                                      clock=lambda: now[0])
    del broker.retained[m.chunk_topic(1)]  # lost by the broker
    broker.publish(m.topic, m.to_wire())
    broker.pump()
    assert f.stats.stored == 3 and not events
    f.poll(5.0)
    assert f.stats.resubscribes == 0
    for t in (20.0, 40.0):
        f.poll(t)
        broker.pump()
    assert f.stats.resubscribes == 2 and not events
    f.poll(60.0)
    (err,) = events
    assert err.reason == "stalled" and err.chunks == (1,)


def test_fetcher_counts_garbage_and_fails_on_withdraw_or_full_disk(tmp_path: Path) -> None:
    data = os.urandom(4 * 1024)
    broker, m, f, events = fake_fetch(tmp_path, data, 1024)
    wire = m.to_wire()
    for junk in (wire[:40], b"\xff\xfe", json.dumps({**json.loads(wire), "v": 2}).encode()):
        broker.publish(m.topic, junk, retain=False)
    broker.pump()
    assert f.on_message(m.topic.replace("manifest", "c/007"), b"x")
    assert not f.on_message("edge/v1/dev-1/cmd/ack", b"x")
    assert f.stats.bad_messages == {"manifest_bad_json": 2, "manifest_wrong_version": 1, "bad_topic": 1}
    assert not events
    broker.publish(m.topic, b"", retain=False)
    broker.pump()
    assert events[0].reason == "withdrawn"

    broker2, m2, _, events2 = fake_fetch(tmp_path / "b", data, 1024,
                                         download_options={"free_bytes": lambda _p: 10})
    broker2.publish(m2.topic, m2.to_wire())
    broker2.pump()
    assert events2[0].reason == "no_space" and "need 4096 bytes" in str(events2[0])


# -- through a real Mosquitto ------------------------------------------------------------------------

class Cloud:
    def __init__(self, broker: Any) -> None:
        self.window = PublishWindow(16)
        self.transport = MqttTransport(BrokerConfig.from_url(broker.url, "cloud-sync"),
                                       on_publish_result=self.window.on_result)
        self.transport.start()
        assert self.transport.wait_connected(5)

    def publish(self, path: Path, **kw: Any) -> p.BundleManifest:
        return publish_bundle(self.transport, path, window=self.window, **kw)

    def stop(self) -> None:
        self.transport.stop()


class Device:
    """A simulated device: its own MQTT connection and fetcher, downloading into its own folder."""

    def __init__(self, broker: Any, name: str, bundle_id: str, dest: Path,
                 gate: Callable[[BundleFetcher], bool] | None = None, **kw: Any) -> None:
        self.gate = gate
        self.transport = MqttTransport(BrokerConfig.from_url(broker.url, name), on_message=self._route,
                                       backoff=Backoff(min_s=0.1, max_s=0.5))
        self.fetcher = BundleFetcher(self.transport, bundle_id, dest, **kw)

    def _route(self, topic: str, payload: bytes) -> None:
        if self.gate is None or self.gate(self.fetcher):
            self.fetcher.on_message(topic, payload)

    def start(self) -> Device:
        self.fetcher.start()
        self.transport.start()
        assert self.transport.wait_connected(5)
        return self

    def stop(self) -> None:
        self.fetcher.close()
        self.transport.stop()


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    from edge_runtime.adapters import ed25519

    ed25519.write_keypair(ed25519.generate(), tmp_path / "release")
    return {"priv": tmp_path / "release", "pub": tmp_path / "release.pub"}


@pytest.mark.integration
def test_a_real_bundle_reaches_three_devices_byte_identical(broker_factory, models_dir: Path, keys: dict[str, Path],
                                                           tmp_path: Path, profile) -> None:
    from edge_runtime.adapters import ed25519
    from edge_runtime.bundle import CreateOptions, create_bundle, verify_bundle

    tar = create_bundle(models_dir / "cnn.onnx", "3", keys["priv"], tmp_path / "cnn-3.tar",
                        CreateOptions(archive=True), profile)
    broker = broker_factory()
    bundle_id = build_manifest(tar).bundle_id
    assert bundle_id.startswith("cnn-3-")
    devices = [Device(broker, f"dev-{i}", bundle_id, tmp_path / f"dev-{i}") for i in range(3)]
    for d in devices[:2]:
        d.start()
    cloud = Cloud(broker)
    try:
        m = cloud.publish(tar)
        assert m.bundle_id == bundle_id and m.chunk_size == 65536 and m.count > 50
        assert cloud.window.stats.max_in_flight <= 16 and cloud.window.stats.completed == m.count + 1
        late = devices[2].start()  # starts after the publish: the retained messages give it everything
        for d in devices:
            assert d.fetcher.wait(20), d.fetcher.state
            assert d.fetcher.error is None
        source = tar.read_bytes()
        for i, d in enumerate(devices):
            got = d.fetcher.result
            assert got == tmp_path / f"dev-{i}" / f"{bundle_id}.tar"
            assert got.read_bytes() == source
            assert list(got.parent.iterdir()) == [got]  # no .part or progress left
            assert d.fetcher.stats.stored == m.count and d.fetcher.stats.bad_chunks == 0
        verify_bundle(late.fetcher.result, [ed25519.read_public(keys["pub"])], workdir=tmp_path / "v")
    finally:
        for d in devices:
            d.stop()
        cloud.stop()


@pytest.mark.integration
def test_an_interrupted_download_resumes_with_only_the_missing_chunks(broker_factory, tmp_path: Path) -> None:
    broker = broker_factory()
    src = random_file(tmp_path / "blob.tar", 1_000_000)
    cloud = Cloud(broker)
    try:
        m = cloud.publish(src, chunk_size=8192, name="blob", version="1")
        half = m.count // 2
        first = Device(broker, "dev-r", m.bundle_id, tmp_path / "dl", window=8,
                       gate=lambda f: f.stats.stored < half).start()
        deadline = time.monotonic() + 10
        while first.fetcher.stats.stored < half and time.monotonic() < deadline:
            time.sleep(0.01)
        first.stop()  # the process goes away (progress persisted on close)
        had = set(range(m.count)) - set(BundleDownload(m, tmp_path / "dl").missing())
        assert len(had) == half
        second = Device(broker, "dev-r", m.bundle_id, tmp_path / "dl", window=8).start()
        try:
            assert second.fetcher.wait(15)
            s = second.fetcher.stats
            assert second.fetcher.result is not None and second.fetcher.result.read_bytes() == src.read_bytes()
            assert s.stored == m.count - half
            assert not set(s.received_indices) & had, "a chunk already on disk was fetched again"
            assert second.fetcher.download is not None and second.fetcher.download.stats.resumed == half
        finally:
            second.stop()
    finally:
        cloud.stop()


@pytest.mark.integration
def test_a_tampered_chunk_fails_clearly_and_a_republish_repairs_it(broker_factory, tmp_path: Path) -> None:
    broker = broker_factory()
    src = random_file(tmp_path / "blob.tar", 300_000, seed=2)
    cloud = Cloud(broker)
    try:
        m = cloud.publish(src, chunk_size=16384, name="blob", version="2")
        cloud.window.publish(cloud.transport, m.chunk_topic(7), b"evil" * 4096, retain=True)
        cloud.window.drain()
        dev = Device(broker, "dev-t", m.bundle_id, tmp_path / "dl").start()
        try:
            assert dev.fetcher.wait(10)
            err = dev.fetcher.error
            assert err is not None and err.reason == "bad_chunks" and err.chunks == (7,)
            assert "chunk 7" in str(err) and "sha256" in str(err)
            assert not (tmp_path / "dl" / f"{m.bundle_id}.tar").exists()
        finally:
            dev.stop()
        cloud.publish(src, chunk_size=16384, name="blob", version="2")  # same id, good chunk 7 again
        again = Device(broker, "dev-t", m.bundle_id, tmp_path / "dl").start()
        try:
            assert again.fetcher.wait(10) and again.fetcher.result is not None
            assert again.fetcher.stats.received_indices == [7]
            assert again.fetcher.result.read_bytes() == src.read_bytes()
        finally:
            again.stop()
    finally:
        cloud.stop()


@pytest.mark.integration
def test_garbage_is_counted_and_ignored_then_withdraw_and_full_disk(broker_factory, tmp_path: Path) -> None:
    broker = broker_factory()
    src = random_file(tmp_path / "blob.tar", 100_000, seed=3)
    cloud = Cloud(broker)
    m = build_manifest(src, chunk_size=8192, name="blob", version="3")
    waiting = Device(broker, "dev-g", m.bundle_id, tmp_path / "dl").start()
    full = Device(broker, "dev-f", m.bundle_id, tmp_path / "full",
                  download_options={"free_bytes": lambda _p: 4096}).start()
    try:
        time.sleep(0.2)  # both subscribed to the manifest
        wire = m.to_wire()
        for junk in (wire[: len(wire) // 2], os.urandom(300), b'{"v":1}'):
            cloud.window.publish(cloud.transport, m.topic, junk)  # live, not retained
        cloud.window.drain()
        deadline = time.monotonic() + 5
        while sum(waiting.fetcher.stats.bad_messages.values()) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert waiting.fetcher.stats.bad_messages == {"manifest_bad_json": 2, "manifest_missing_field": 1}
        assert not waiting.fetcher.finished
        cloud.publish(src, chunk_size=8192, name="blob", version="3")
        assert waiting.fetcher.wait(10) and waiting.fetcher.result is not None
        assert full.fetcher.wait(10)
        err = full.fetcher.error
        assert err is not None and err.reason == "no_space"
        assert f"need {m.size} bytes" in str(err) and "4096 available" in str(err)

        withdraw_bundle(cloud.transport, m, window=cloud.window)
        late = Device(broker, "dev-l", m.bundle_id, tmp_path / "late").start()
        try:
            time.sleep(0.5)
            assert late.fetcher.state == "waiting_manifest" and late.fetcher.stats.manifests == 0
        finally:
            late.stop()
    finally:
        waiting.stop()
        full.stop()
        cloud.stop()


@pytest.mark.integration
def test_publishing_waits_for_acks_with_a_bounded_window(broker_factory, tmp_path: Path) -> None:
    broker = broker_factory()
    src = random_file(tmp_path / "blob.tar", 2_000_000, seed=4)
    cloud = Cloud(broker)
    cloud.window.size = 4
    try:
        m = cloud.publish(src, chunk_size=4096, name="blob", version="4")
        assert m.count == 489
        st_ = cloud.window.stats
        assert st_.completed == m.count + 1 and st_.refused == 0 and st_.max_in_flight <= 4
        got: dict[str, bytes] = {}
        done = threading.Event()

        def on_message(topic: str, payload: bytes) -> None:
            got[topic] = payload
            if len(got) == 3:
                done.set()

        reader = MqttTransport(BrokerConfig.from_url(broker.url, "reader"), on_message=on_message)
        for t in (m.topic, m.chunk_topic(0), m.chunk_topic(m.count - 1)):
            reader.subscribe(t)
        reader.start()
        try:
            assert done.wait(5)
            assert p.BundleManifest.from_wire(got[m.topic], m.topic) == m
            assert got[m.chunk_topic(m.count - 1)] == src.read_bytes()[(m.count - 1) * 4096:]
        finally:
            reader.stop()
    finally:
        cloud.stop()
