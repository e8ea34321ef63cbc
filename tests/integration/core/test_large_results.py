"""Results and exceptions too large for the way back travel by reference.

A worker puts a result (or pickled exception) above ``RESULT_INLINE_LIMIT`` in the store
the payload names and signs a reference with its sha256; the caller takes it in a thread,
checks it before unpickling, and deletes it once the run ends (runs whose outcome the
ledger keeps, with a key or ``detach``, keep it for later readers). Through the real
``process`` executor, with both return paths (HTTP receiver, Redis drop box) and both
store kinds a single host uses (a directory, Redis).
"""

from __future__ import annotations

import os
import pickle
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from wove_adapters import Hub
from wove_adapters.core import envelope as payload_mod
from wove_adapters.core import frames
from wove_adapters.core.codec import BY_REFERENCE, StoredResultError, decode_outcome
from wove_adapters.core.signing import encode_blob
from wove_adapters.core.stores import open_store
from wove_adapters.testing import tasks
from wove_adapters.testing.conformance import wait_for_file
from wove_adapters.worker import runner, sender

MiB = 1024 * 1024
REDIS = "redis://127.0.0.1:6379/0"
STORE = Path(os.environ["WOVE_ADAPTERS_HOME"]) / "payloads"


def blob(size: int) -> bytes:
    return os.urandom(size)


class Bulky(Exception):
    """An exception that carries more than the way back takes inline."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)  # pickled as its args: the data travels with it
        self.data = data

    def __str__(self) -> str:
        return f"bulky: {len(self.data)} bytes"


def raise_bulky(size: int) -> None:
    raise Bulky(os.urandom(size))


def _unpickled(marker: str, data: bytes) -> Marked:
    Path(marker).write_text("unpickled")
    return Marked(marker, data)


class Marked:
    """A value whose unpickling writes ``marker``: it shows whether the caller unpickled."""

    def __init__(self, marker: str, data: bytes) -> None:
        self.marker = marker
        self.data = data

    def __reduce__(self) -> tuple[Any, tuple[str, bytes]]:
        return _unpickled, (self.marker, self.data)


def marked(marker: str, size: int) -> Marked:
    return Marked(marker, os.urandom(size))


def stored() -> set[str]:
    return {path.name for path in STORE.glob("*")} if STORE.exists() else set()


def settled(before: set[str], timeout: float = 10.0) -> set[str]:
    """What the store holds beyond ``before`` once the run's release had time to run."""
    deadline = time.monotonic() + timeout
    while True:
        extra = stored() - before
        if not extra or time.monotonic() > deadline:
            return extra
        time.sleep(0.05)


@pytest.fixture(scope="module", params=["http", "redis"])
def hub(request: pytest.FixtureRequest) -> Iterator[Hub]:
    config: dict[str, Any] = {}
    if request.param == "redis":
        config = {"return_path": "redis", "return_redis_url": REDIS}
    with Hub(
        environments={"p": {"executor": "process", "executor_config": config}},
        default_environment="p",
    ) as h:
        yield h


def _no_fallback(err: str) -> None:
    assert "refused the outcome" not in err
    assert "recorded in the ledger" not in err
    assert "could not put" not in err


@pytest.mark.parametrize("size_mib", [20, 100])
def test_large_result_arrives_by_reference(
    hub: Hub, size_mib: int, capfd: pytest.CaptureFixture[str]
) -> None:
    before = stored()
    receiver = hub.dispatcher("p").transport.receiver  # type: ignore[attr-defined]
    too_large = receiver.stats["too_large"]
    started = time.perf_counter()
    data = hub.run(blob, size_mib * MiB)
    took = time.perf_counter() - started
    assert len(data) == size_mib * MiB
    # It came over the way back (not the ledger, not refused): no warning, nothing
    # refused as too large, and the store holds nothing more once the run has ended.
    _no_fallback(capfd.readouterr().err)
    assert receiver.stats["too_large"] == too_large
    assert settled(before) == set()
    print(f"{size_mib} MiB result: {took:.2f}s")


def test_large_exception_arrives_by_reference(
    hub: Hub, capfd: pytest.CaptureFixture[str]
) -> None:
    before = stored()
    with pytest.raises(Bulky) as caught:
        hub.run(raise_bulky, 8 * MiB)
    assert len(caught.value.data) == 8 * MiB
    assert "in raise_bulky" in str(caught.value.__cause__)  # the worker's traceback
    _no_fallback(capfd.readouterr().err)
    assert settled(before) == set()


def test_small_result_stays_inline(hub: Hub) -> None:
    before = stored()
    assert hub.run(blob, 1024) and hub.run(tasks.add, 1) == 2
    assert stored() - before == set()


def test_result_in_a_redis_store_is_deleted_after_the_run() -> None:
    import redis

    prefix = f"wove-test-large-results:{uuid.uuid4().hex}:"
    store = f"{REDIS}?prefix={prefix}"
    client = redis.Redis.from_url(REDIS)
    with Hub(
        environments={"p": {"executor": "process", "executor_config": {"payload_store": store}}},
        default_environment="p",
    ) as hub:
        assert len(hub.run(blob, 20 * MiB)) == 20 * MiB
        deadline = time.monotonic() + 10
        while client.keys(prefix + "*") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.keys(prefix + "*") == []


def test_keyed_result_stays_for_later_callers_and_a_tampered_one_is_refused(
    tmp_path: Path,
) -> None:
    """The ledger keeps a keyed run's outcome, so its stored result stays (until the
    store expires it) and a later caller with the key reads it by reference; once its
    bytes are changed, that caller gets the refusal, and nothing is unpickled."""
    marker = tmp_path / "unpickled"
    key = f"large-{uuid.uuid4().hex}"
    options = {"delivery_idempotency_key": key}
    with Hub(environments={"p": {"executor": "process"}}, default_environment="p") as hub:
        before = stored()
        first = hub.run(marked, str(marker), 6 * MiB, task_options=options)
        assert len(first.data) == 6 * MiB
        time.sleep(0.5)  # the run's release has run: it kept the result
        kept = stored() - before
        assert len(kept) == 1 and ".result." in next(iter(kept))
        path = STORE / next(iter(kept))
        marker.unlink()
        again = hub.run(marked, str(marker), 1, task_options=options)  # recorded: not run
        assert again.data == first.data
        marker.unlink()
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        path.write_bytes(bytes(raw))
        with pytest.raises(StoredResultError, match="do not match the sha256") as caught:
            hub.run(marked, str(marker), 1, task_options=options)
        assert "nothing was unpickled" in str(caught.value)
        assert not marker.exists()
        path.unlink()


def test_a_plain_result_is_deleted_a_detached_ones_stays_for_hub_result() -> None:
    """A plain run's ledger record does not keep its value (its stored result is gone at
    once, and reading the record says why); a detach run's does, by reference."""
    with Hub(environments={"p": {"executor": "process"}}, default_environment="p") as hub:
        before = stored()
        plain = hub.submit(blob, 6 * MiB)
        assert len(plain.result(timeout=60)) == 6 * MiB
        assert settled(before) == set()
        with pytest.raises(StoredResultError, match="cannot be read"):
            hub.result(plain.run_id, timeout=5)
        kept = hub.submit(blob, 6 * MiB, task_options={"delivery_orphan_policy": "detach"})
        value = kept.result(timeout=60)
        time.sleep(0.5)  # had release deleted it, it would be gone by now
        left = stored() - before
        assert len(left) == 1
        assert hub.result(kept.run_id, timeout=5) == value
        (STORE / left.pop()).unlink()


def _signed_result(run_id: str, key_id: str, data: bytes, *, tamper: bool) -> bytes:
    ref = open_store(None).put(f"test-{uuid.uuid4().hex}.result", data)
    if tamper:
        path = STORE / ref.key
        raw = bytearray(path.read_bytes())
        raw[-2] ^= 0xFF
        path.write_bytes(bytes(raw))
    event = frames.TaskResult(run_id=run_id, task_id="sleepy", result=BY_REFERENCE,
                              result_ref=ref)
    return encode_blob(sender.sign_events([event], key_id))


@pytest.mark.parametrize("damage", ["tampered", "missing"])
def test_a_bad_reference_is_the_runs_clear_error(damage: str, tmp_path: Path) -> None:
    """A genuine, signed event whose stored result was changed (or is gone) fails its run
    with StoredResultError, through the live receiver, and nothing is unpickled."""
    import urllib.error
    import urllib.request

    marker = tmp_path / "unpickled"
    data = payload_mod.dumps(Marked(str(marker), b"x" * 1024))
    with Hub(environments={"p": {"executor": "process"}}, default_environment="p") as hub:
        future = hub.submit(tasks.sleepy, str(tmp_path), "victim", 30.0)
        wait_for_file(tmp_path / "victim.started", 20)
        dispatcher = hub.dispatcher("p")
        body = _signed_result(future.run_id, dispatcher.key_id, data,
                              tamper=damage == "tampered")
        if damage == "missing":
            for path in STORE.glob("test-*.result"):
                path.unlink()
        receiver = dispatcher.transport.receiver  # type: ignore[attr-defined]
        request = urllib.request.Request(receiver.url, data=body, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.status == 200
        except urllib.error.HTTPError as exc:  # pragma: no cover - shows the refusal
            raise AssertionError(exc.read()) from None
        with pytest.raises(StoredResultError) as caught:
            future.result(timeout=20)
        expected = "do not match the sha256" if damage == "tampered" else "cannot be read"
        assert expected in str(caught.value) and future.run_id in str(caught.value)
        assert not marker.exists()
    if damage == "tampered":
        # The run's release deletes only its own keys in its own store: not this one,
        # which a signed event named.
        assert list(STORE.glob("test-*.result"))
    for path in STORE.glob("test-*.result"):
        path.unlink()


def test_decode_outcome_checks_a_reference_before_unpickling(tmp_path: Path) -> None:
    """The ledger's readers (followers, Hub.result, `wove-adapters result`) take a result
    by reference the same way: read, checked, never deleted (others may follow)."""
    marker = tmp_path / "unpickled"
    with Hub(environments={"p": {"executor": "process"}}, default_environment="p") as hub:
        key_id = hub.dispatcher("p").key_id
    data = payload_mod.dumps(Marked(str(marker), b"y" * 1024))
    good = _signed_result("r:1", key_id, data, tamper=False)
    taken: list[Any] = []
    frame = decode_outcome(good, "r:1", key_id=key_id, taken=taken)
    assert frame["result"].data == b"y" * 1024 and marker.exists()
    assert len(taken) == 1 and (STORE / taken[0].key).exists()  # read, not deleted
    marker.unlink()
    bad = _signed_result("r:2", key_id, data, tamper=True)
    with pytest.raises(StoredResultError, match="do not match the sha256"):
        decode_outcome(bad, "r:2", key_id=key_id)
    assert not marker.exists()
    for path in STORE.glob("test-*.result"):
        path.unlink()


def _envelope(**changes: Any) -> payload_mod.Envelope:
    envelope = payload_mod.build_envelope(
        adapter="process", run_id="r:1", task_id="blob", attempt=1, func=blob,
        args={"size": 1}, return_path=payload_mod.ReturnPath(url="http://127.0.0.1:9/x"),
        delivery={}, key_id="k", inline_limit=1 << 20, store_url=None,
    )
    return msgspec.structs.replace(envelope, **changes)


def test_who_sends_a_result_inline() -> None:
    """A caller that names no result store (older than this field, or a native return
    path), and a worker on another host than the caller's default store: inline, as
    before. An explicitly configured store is taken to be shared."""
    final = {"run_id": "r:1", "task_id": "blob", "attempt": 1, "idempotency_key": None}
    large = b"z" * (runner.RESULT_INLINE_LIMIT + 1)
    assert _envelope().result_store_host  # the default store: a directory on this host
    assert runner.result_event(_envelope(result_store=None), final, large).result == large
    elsewhere = _envelope(result_store_host="another-host")
    assert runner.result_event(elsewhere, final, large).result_ref is None
    native = payload_mod.build_envelope(
        adapter="process", run_id="r:1", task_id="blob", attempt=1, func=blob,
        args={"size": 1}, return_path=payload_mod.ReturnPath(kind="native"),
        delivery={}, key_id="k", inline_limit=1 << 20, store_url=None,
    )
    assert native.result_store is None
    small = b"z" * runner.RESULT_INLINE_LIMIT
    assert runner.result_event(_envelope(), final, small).result == small
    event = runner.result_event(_envelope(), final, large)
    assert event.result_ref is not None and event.result == BY_REFERENCE
    open_store(event.result_ref.store).delete(event.result_ref)


class _OldTaskResult(msgspec.Struct, frozen=True, kw_only=True, tag_field="type",
                     tag="task_result"):
    """TaskResult as a reader older than ``result_ref`` declares it."""

    run_id: str
    task_id: str = ""
    attempt: int = 1
    result: bytes
    idempotency_key: str | None = None


def test_an_older_reader_fails_with_a_message_not_a_wrong_value() -> None:
    ref = open_store(None).put(f"test-{uuid.uuid4().hex}.result", b"data")
    event = frames.TaskResult(run_id="r:1", result=BY_REFERENCE, result_ref=ref)
    old = msgspec.msgpack.decode(msgspec.msgpack.encode(event), type=_OldTaskResult)
    with pytest.raises(AttributeError, match="sent by reference.*upgrade wove-adapters"):
        pickle.loads(old.result)
    open_store(None).delete(ref)
