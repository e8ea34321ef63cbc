"""Issue 13, item 3 (the caller's side): an event is accepted only under its run's key.

The holder of another environment's key (a sandbox's secret) must not resolve a trusted
environment's runs, nor make the caller unpickle anything; a key the caller does not hold
in memory is never looked up on disk from the event loop; the Redis drop box applies the
same checks, and drops entries over its size limit unread.
"""

from __future__ import annotations

import os
import pickle
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from wove_adapters import Hub
from wove_adapters.callbacks.dropbox import DEFAULT_MAX_ENTRY, DropboxReader, get_dropbox
from wove_adapters.callbacks.receiver import CallbackReceiver
from wove_adapters.core import frames, signing
from wove_adapters.core import loop as shared_loop
from wove_adapters.core.paths import data_dir
from wove_adapters.testing import tasks
from wove_adapters.testing.conformance import wait_for_file

REDIS_URL = os.environ.get("WOVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


class Touch:
    """Unpickling it creates a file: proof that the caller unpickled a forged result."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


def test_another_environments_key_resolves_no_run(
    tmp_path: Path,
    receiver_for: Callable[..., CallbackReceiver],
    sign: Callable[[list[frames.WireEvent], str], bytes],
    post_raw: Callable[..., int],
) -> None:
    """(before: the sandbox key's forged result was routed, and unpickled in the caller)."""
    receiver = receiver_for()
    shared = {"callback_token": receiver.token}
    sandbox_secret = f"sandbox-{uuid.uuid4().hex}"
    environments = {
        "trusted": {"executor": "process", "executor_config": shared},
        "sandbox": {"executor": "process", "executor_config": {
            **shared, "secret": sandbox_secret,
            "env": {"WOVE_ADAPTERS_SECRET": sandbox_secret}}},
    }
    marker = tmp_path / "unpickled"
    with Hub(environments=environments, default_environment="trusted") as hub:
        assert hub.run(tasks.add, 1, environment="sandbox") == 2
        sandbox_key = hub.dispatcher("sandbox").key_id
        assert sandbox_key != hub.dispatcher("trusted").key_id
        future = hub.submit(tasks.sleepy, str(tmp_path), "victim", 2.0)
        wait_for_file(tmp_path / "victim.started", 20)
        forged = frames.TaskResult(run_id=future.run_id, task_id="sleepy", attempt=1,
                                   result=pickle.dumps(Touch(marker)))
        statuses = [post_raw(receiver, sign([forged], sandbox_key)) for _ in range(3)]
        assert future.result(timeout=30) == "victim"
    print(f"sandbox key on a trusted run: {statuses}, {receiver.stats}")
    assert statuses == [401] * 3
    assert receiver.stats["wrong_key"] == 3
    assert not marker.exists()


def test_a_key_on_disk_but_not_in_memory_is_never_read(
    receiver_for: Callable[..., CallbackReceiver],
    sign: Callable[[list[frames.WireEvent], str], bytes],
    post_raw: Callable[..., int],
) -> None:
    """A key file this process did not generate (another caller's, or a planted one), and
    a FIFO named like a key file: refused at once, without opening either (before: the
    key file was read on the loop and the event accepted)."""
    receiver = receiver_for()
    run_id = f"disk-{uuid.uuid4().hex}"
    got: list[Any] = []
    receiver.register(run_id, lambda event, raw: got.append(event))
    other = signing.Keyring()
    key = os.urandom(32)
    other_id = other.add(key)
    keys = data_dir() / "keys"
    keys.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = keys / f"{other_id}.key"
    path.write_text(key.hex())
    path.chmod(0o600)
    fifo_id = uuid.uuid4().hex[:16]
    os.mkfifo(keys / f"{fifo_id}.key", 0o600)
    try:
        event = frames.TaskResult(run_id=run_id, task_id="t", attempt=1, result=b"\x80\x04K\x07.")
        on_disk = signing.encode_blob(signing.sign(
            msgpack_batch([event]), other_id, keyring=other))
        faked = signing.SignedBlob(fifo_id, time.time(), "n" * 24, b"\0" * 32,
                                   msgpack_batch([event]))
        started = time.monotonic()
        statuses = [post_raw(receiver, on_disk, timeout=5),
                    post_raw(receiver, signing.encode_blob(faked), timeout=5)]
        took = time.monotonic() - started
    finally:
        path.unlink()
        (keys / f"{fifo_id}.key").unlink()
    print(f"keys on disk only: {statuses} in {took:.2f}s")
    assert statuses == [401, 401] and got == [] and took < 2


def msgpack_batch(events: list[frames.WireEvent]) -> bytes:
    import msgspec

    return msgspec.msgpack.encode(frames.EventBatch(events=events))


@pytest.fixture
def dropbox() -> DropboxReader:
    return shared_loop.run_sync(get_dropbox(REDIS_URL), timeout=30)


def test_dropbox_binds_keys_and_limits_entries(
    dropbox: DropboxReader,
    key_id: str,
    sign: Callable[[list[frames.WireEvent], str], bytes],
) -> None:
    """A genuine entry is routed; one signed with another held key, one over the size
    limit and a large forged one are dropped, unrouted (before: the first was routed,
    the others verified on the loop)."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    other_key = signing.KEYRING.add(os.urandom(32))
    run_id = f"box-{uuid.uuid4().hex}"
    got: list[Any] = []
    dropbox.register(run_id, lambda event, raw: got.append(event), key_id=key_id)
    stats = dict(dropbox.stats)

    def push(data: bytes) -> None:
        client.rpush(dropbox.key, data)

    def settled() -> None:
        deadline = time.monotonic() + 20
        while client.llen(dropbox.key) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)

    heartbeat = frames.Heartbeat(run_id=run_id, task_id="t")
    try:
        push(sign([heartbeat], other_key))
        push(b"\0" * (DEFAULT_MAX_ENTRY + 1))
        blob = signing.sign(msgpack_batch([frames.TaskResult(
            run_id=run_id, task_id="t", attempt=1, result=os.urandom(8 << 20))]), key_id)
        push(signing.encode_blob(signing.SignedBlob(
            blob.key_id, blob.timestamp, blob.nonce, b"\0" * 32, blob.body)))
        settled()
        assert got == []
        push(sign([heartbeat], key_id))
        settled()
    finally:
        dropbox.unregister(run_id)
        client.close()
    grew = {name: dropbox.stats[name] - stats[name] for name in stats}
    print(f"drop box: routed {len(got)}, {grew}")
    assert len(got) == 1
    counted = (grew["wrong_key"], grew["too_large"], grew["rejected"], grew["accepted"])
    assert counted == (1, 1, 3, 1)
