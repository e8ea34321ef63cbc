"""A broker that goes away between runs: the submit error names the environment, the
executor, the address (password hidden) and the setting to fix (issue 11, item 6).

Uses a private, password-protected ``redis-server`` on a free port, started and killed
(by PID) by this test; no rq worker is needed, since the submit itself fails.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from wove_adapters import Hub
from wove_adapters.core.errors import BackendUnavailableError

PASSWORD = "s3cret-pw"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def private_redis() -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = _free_port()
    try:
        proc = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--requirepass", PASSWORD],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
    except FileNotFoundError:
        pytest.fail("redis-server is not installed: apt-get install redis-server")
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the private redis-server on 127.0.0.1:{port} did not start")
        time.sleep(0.05)
    try:
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _square(x: int) -> int:
    return x * x


def test_broker_down_at_submit_names_environment_address_and_setting(
    private_redis: tuple[subprocess.Popen[bytes], int],
) -> None:
    proc, port = private_redis
    url = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
    hub = Hub(
        environments={"images": {"executor": "rq",
                                 "executor_config": {"redis_url": url, "queue": "wove-gone"}}},
        default_environment="images",
        ledger="memory://",
    )
    with hub:
        hub.dispatcher("images")  # started while the broker was up
        proc.kill()
        proc.wait()
        future = hub.submit(_square, 3)
        with pytest.raises(BackendUnavailableError) as info:
            future.result(timeout=60)
    error = info.value
    message = str(error)
    print(message)
    assert message.startswith(
        f"environment 'images' (rq): could not submit to Redis at "
        f"redis://:***@127.0.0.1:{port}/0: "
    ), message
    assert "111" in message or "refused" in message.lower(), message  # the library's text
    assert message.endswith("; check executor_config.redis_url and that Redis is running")
    assert PASSWORD not in message
    assert isinstance(error, ConnectionError)
    assert error.__cause__ is not None and type(error.__cause__).__module__.startswith("redis")
    assert str(error.__cause__) in message
    assert (error.environment, error.executor, error.setting) == (
        "images", "rq", "executor_config.redis_url")
