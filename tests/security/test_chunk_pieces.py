"""A chunk carries several signed payloads in one backend message; each piece is checked
on its own. A broker writer who slips forged, tampered or unsigned pieces into a chunk
(or sends a chunk of them) gets each refused alone: none runs, nothing is signed or sent
for it, and the genuine pieces beside it run and report as usual. Counted: accepted
forgeries 0, genuine runs lost 0.
"""

from __future__ import annotations

import base64
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from wove_adapters.callbacks.receiver import CallbackReceiver
from wove_adapters.core import envelope as payload_mod
from wove_adapters.core import signing
from wove_adapters.testing import tasks
from wove_adapters.worker import chunks


def _envelope(run_id: str, key_id: str, receiver: CallbackReceiver, directory: Path) -> Any:
    return payload_mod.build_envelope(
        adapter="celery", run_id=run_id, task_id="record", attempt=1, func=tasks.record,
        args={"directory": str(directory), "tag": run_id.replace(":", "-"), "value": 1},
        return_path=payload_mod.ReturnPath(kind="http", url=receiver.url),
        delivery={}, key_id=key_id, inline_limit=1 << 20, store_url=None,
    )


def test_forged_tampered_and_unsigned_pieces_are_refused_alone(
    tmp_path: Path, receiver_for: Callable[..., CallbackReceiver], key_id: str
) -> None:
    receiver = receiver_for()
    call = uuid.uuid4().hex[:8]
    genuine = [f"chunk-{call}:ok{i}" for i in range(2)]
    forged_ids = [f"chunk-{call}:{name}" for name in ("forged", "tampered", "unsigned")]
    arrived: dict[str, str] = {}
    lock = threading.Lock()

    def sink(event: Any, raw: bytes) -> None:
        with lock:
            arrived[event.run_id] = type(event).__name__

    # Every run id is followed here: an event for a forged one would be accepted, so
    # none arriving shows the worker sent none.
    for run_id in genuine + forged_ids:
        receiver.register(run_id, sink, key_id=key_id, chunk=call)
    pieces = [payload_mod.encode_payload(_envelope(r, key_id, receiver, tmp_path))
              for r in genuine]
    forger = signing.Keyring()
    forger_key = forger.add(os.urandom(32))
    forged_env = _envelope(forged_ids[0], forger_key, receiver, tmp_path)
    forged = payload_mod.PAYLOAD_PREFIX + base64.urlsafe_b64encode(signing.encode_blob(
        signing.sign(msgspec.msgpack.encode(forged_env), forger_key, keyring=forger)
    )).decode()
    honest = payload_mod.encode_payload(_envelope(forged_ids[1], key_id, receiver, tmp_path))
    raw = bytearray(base64.urlsafe_b64decode(honest[len(payload_mod.PAYLOAD_PREFIX):]))
    raw[len(raw) // 2] ^= 0x01  # one bit of the signed body flipped
    tampered = payload_mod.PAYLOAD_PREFIX + base64.urlsafe_b64encode(bytes(raw)).decode()
    unsigned = payload_mod.PAYLOAD_PREFIX + base64.urlsafe_b64encode(msgspec.msgpack.encode(
        _envelope(forged_ids[2], key_id, receiver, tmp_path))).decode()

    text = payload_mod.encode_chunk([pieces[0], forged, tampered, pieces[1], unsigned])
    done = chunks.run_chunk(text, handle_sigterm=False)

    assert done.refused == 3
    assert [o.state.value for o in done.outcomes] == ["succeeded", "succeeded"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(arrived) < 2:
        time.sleep(0.02)
    time.sleep(0.3)  # anything else on its way arrives too
    with lock:
        accepted_forgeries = sum(1 for run_id in forged_ids if run_id in arrived)
        lost = sum(1 for run_id in genuine if arrived.get(run_id) != "TaskResult")
    assert accepted_forgeries == 0
    assert lost == 0
    ran = sorted(p.name for p in tmp_path.glob("*.runs"))
    assert ran == sorted(f"{r.replace(':', '-')}.runs" for r in genuine), ran


def test_a_chunk_of_garbage_is_refused_whole(tmp_path: Path) -> None:
    done = chunks.run_chunk(payload_mod.CHUNK_PREFIX + "not~base64~at all")
    assert done.refused == 3 and not done.outcomes
    assert not done.delivered or done.outcomes == []
