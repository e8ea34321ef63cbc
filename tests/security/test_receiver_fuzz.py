"""Issue 13, proof: a bounded fuzzer of the real receiver.

At least 20,000 requests from another process (so the caller's loop and the fuzzer get a
core each), over a few keep-alive connections: mutated genuine blobs, random bytes, bad
and non-ASCII tokens, unknown keys, another held key than the run's, stale timestamps,
replays, huge declared lengths, absent lengths, chunked junk, wrong methods and paths.
Counted: accepted forgeries 0, 5xx 0, requests left unanswered 0; each genuine batch
the fuzzer mixes in is accepted exactly once (as itself, or as a replay that overtook it
on another connection), and a legitimate event still round-trips afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from typing import Any

from wove_adapters.callbacks.receiver import CallbackReceiver
from wove_adapters.core import signing

REQUESTS = int(os.environ.get("WOVE_FUZZ_REQUESTS", "20000"))

FUZZER = textwrap.dedent(
    r"""
    import asyncio, hashlib, hmac, json, os, random, sys, time
    import msgspec
    from wove_adapters.core import frames, signing

    cfg = json.loads(sys.argv[1])
    rng = random.Random(cfg["seed"])
    ring = signing.Keyring()
    key_id = ring.add(bytes.fromhex(cfg["key"]))
    other_id = ring.add(bytes.fromhex(cfg["other"]))
    stranger_id = ring.add(os.urandom(32))  # a key the caller does not hold
    run_id, path, max_body = cfg["run_id"], cfg["path"], cfg["max_body"]

    def batch() -> bytes:
        kind = rng.random()
        if kind < 0.5:
            event = frames.Heartbeat(run_id=run_id, task_id="t")
        else:
            event = frames.Log(run_id=run_id, task_id="t", message="x" * rng.randrange(64))
        return msgspec.msgpack.encode(frames.EventBatch(events=[event]))

    def blob(key: str = key_id, body: bytes | None = None, at: float | None = None) -> bytes:
        signed = signing.sign(batch() if body is None else body, key, keyring=ring)
        if at is not None:
            mac = hmac.new(ring.get(key), f"{at!r}.{signed.nonce}.".encode(), hashlib.sha256)
            mac.update(signed.body)
            signed = signing.SignedBlob(key, at, signed.nonce, mac.digest(), signed.body)
        return signing.encode_blob(signed)

    def mutate(original: bytes) -> bytes:
        while (mutated := _mutate(original)) == original:
            pass  # a byte set to the value it had: not a mutation
        return mutated

    def _mutate(original: bytes) -> bytes:
        data = bytearray(original)
        for _ in range(rng.randrange(1, 4)):
            how = rng.randrange(6)
            spot = rng.randrange(len(data)) if data else 0
            if how == 0 and data:
                data[spot] ^= 1 << rng.randrange(8)
            elif how == 1:
                del data[spot:]
            elif how == 2:
                data[spot:spot] = os.urandom(rng.randrange(1, 16))
            elif how == 3 and data:
                data[spot] = rng.randrange(256)
            elif how == 4:
                data += os.urandom(rng.randrange(1, 64))
            else:
                del data[spot:spot + rng.randrange(1, 16)]
        return bytes(data)

    genuine_sent = []

    def request():
        # (category, method, path, headers, body, close after)
        pick = rng.random()
        if pick < 0.04:
            data = blob()
            genuine_sent.append(data)
            return "genuine", "POST", path, {}, data, False
        if pick < 0.40:
            return "mutated", "POST", path, {}, mutate(blob()), False
        if pick < 0.50:
            return "random", "POST", path, {}, os.urandom(rng.randrange(0, 4096)), False
        if pick < 0.58:
            token = rng.choice([
                "%C3%A9t%C3%A9", "%FF", "%ED%A0%80", "x" * rng.randrange(1, 300),
                path.rsplit("/", 1)[1][:-1], path.rsplit("/", 1)[1] + "x", "..%2F..%2F",
                os.urandom(8).hex(),
            ])
            return "token", "POST", path.rsplit("/", 1)[0] + "/" + token, {}, blob(), False
        if pick < 0.66:
            return "stranger key", "POST", path, {}, blob(stranger_id), False
        if pick < 0.74:
            return "other key", "POST", path, {}, blob(other_id), False
        if pick < 0.79:
            at = time.time() + rng.choice([-1, 1]) * rng.uniform(400, 1e6)
            return "stale", "POST", path, {}, blob(at=at), False
        if pick < 0.84 and genuine_sent:
            return "replay", "POST", path, {}, rng.choice(genuine_sent), False
        if pick < 0.88:
            length = rng.choice([max_body + 1, 2**31, 10**12, 500_000_000])
            return "huge length", "POST", path, {"Content-Length": str(length)}, b"", True
        if pick < 0.92:
            return "absent length", "POST", path, {"Content-Length": None}, b"", False
        if pick < 0.96:
            junk = mutate(blob()) or b"x"  # empty, its chunk would end the body early
            chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(junk), junk)
            headers = {"Content-Length": None, "Transfer-Encoding": "chunked"}
            return "chunked", "POST", path, headers, chunked, True
        method, where = rng.choice([("GET", path), ("PUT", path), ("POST", "/"),
                                    ("POST", "/wove/events"), ("GET", "/wove/health/x")])
        return "method/path", method, where, {}, b"", False

    counts = {}
    statuses = {}
    accepted_blobs = {}
    async def worker(queue):
        reader = writer = None
        while True:
            try:
                item = queue.pop()
            except IndexError:
                break
            category, method, where, extra, body, close = item
            if writer is None:
                reader, writer = await asyncio.open_connection(cfg["host"], cfg["port"])
            headers = {"Host": "x", "Content-Length": str(len(body))}
            headers.update(extra)
            head = f"{method} {where} HTTP/1.1\r\n" + "".join(
                f"{k}: {v}\r\n" for k, v in headers.items() if v is not None)
            status = 0
            try:
                writer.write(head.encode() + b"\r\n" + body)
                line = await asyncio.wait_for(reader.readline(), 30)
                if line.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")):
                    status = int(line[9:12])
                length, keep = 0, True
                while True:
                    header = await reader.readline()
                    if header in (b"\r\n", b""):
                        break
                    name, _, value = header.decode("latin-1").partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                    if name.lower() == "connection" and value.strip().lower() == "close":
                        keep = False
                if length:
                    await reader.readexactly(length)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                keep = False
            key = f"{category} {status}"
            if 200 <= status < 300 and category in ("genuine", "replay"):
                digest = hashlib.sha256(body).hexdigest()
                accepted_blobs[digest] = accepted_blobs.get(digest, 0) + 1
            if status == 0 and "line" in locals():
                print("no answer:", category, head[:80], body[:200], line[:80], file=sys.stderr)
            statuses[key] = statuses.get(key, 0) + 1
            if close or not keep or status == 0:
                writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    async def main():
        queue = [request() for _ in range(cfg["count"])]
        queue.reverse()
        started = time.monotonic()
        await asyncio.gather(*(worker(queue) for _ in range(cfg["connections"])))
        print(json.dumps({"statuses": statuses, "genuine": len(genuine_sent),
                          "accepted_blobs": len(accepted_blobs),
                          "most_per_blob": max(accepted_blobs.values(), default=0),
                          "seconds": time.monotonic() - started}), flush=True)

    asyncio.run(main())
    """
)


def test_fuzzed_requests_are_never_accepted(
    receiver_for: Callable[..., CallbackReceiver],
    round_trip: Callable[[CallbackReceiver, str], bool],
    traceback_log: list[Any],
) -> None:
    receiver = receiver_for()
    key, other = os.urandom(32), os.urandom(32)
    key_id, other_id = signing.KEYRING.add(key), signing.KEYRING.add(other)
    run_id = f"fuzz-{uuid.uuid4().hex}"
    routed: list[Any] = []
    receiver.register(run_id, lambda event, raw: routed.append(event), key_id=key_id)
    # The other held key signs runs of its own: the binding, not "unknown key", refuses it.
    receiver.register(f"{run_id}-other", lambda event, raw: None, key_id=other_id)
    config = {
        "seed": 13, "count": REQUESTS, "connections": 8, "key": key.hex(),
        "other": other.hex(), "run_id": run_id, "host": receiver.host,
        "port": receiver.port, "path": "/" + receiver.url.split("/", 3)[3],
        "max_body": receiver.max_body,
    }
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", FUZZER, json.dumps(config)],
                          capture_output=True, text=True, timeout=120)
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    statuses: dict[str, int] = report["statuses"]
    print(f"fuzz: {sum(statuses.values())} requests in {took:.1f}s: "
          f"{dict(sorted(statuses.items()))}; receiver {receiver.stats}")
    assert sum(statuses.values()) == REQUESTS >= 20_000 or "WOVE_FUZZ_REQUESTS" in os.environ
    accepted = {key: n for key, n in statuses.items() if key.split()[-1].startswith("2")}
    # Each genuine batch is accepted exactly once. Eight connections send concurrently,
    # so a replay can reach the receiver while its original is still in flight: then
    # the replay is the copy that lands and the original is the one refused.
    assert set(accepted) <= {"genuine 200", "replay 200"}, accepted
    assert sum(accepted.values()) == report["genuine"], accepted
    assert report["accepted_blobs"] == report["genuine"] and report["most_per_blob"] == 1
    assert not [key for key in statuses if key.split()[-1].startswith("5")]
    assert not [key for key in statuses if key.split()[-1] == "0"], done.stderr[-2000:]
    assert receiver.stats["accepted"] == report["genuine"] == len(routed)
    assert took < 60
    assert traceback_log == []
    assert round_trip(receiver, key_id)
