"""Errors at the submit boundary: which errors mean "unreachable", where the backend lives,
and that a password never reaches a message. (The end-to-end case, a real broker that
goes away, is tests/integration/rq/test_boundary_errors_rq.py.)"""

from __future__ import annotations

import pickle
import socket

import pytest

from wove_adapters.core.errors import BackendUnavailableError, WoveAdaptersError
from wove_adapters.core.executors.local import LocalTransport
from wove_adapters.core.runtime import _backend_address, _unreachable, redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@127.0.0.1:6437/0", "redis://:***@127.0.0.1:6437/0"),
        ("amqp://guest:guest@localhost:5672//", "amqp://guest:***@localhost:5672//"),
        ("redis://user@host/1", "redis://user@host/1"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("tcp://10.0.0.5:8786", "tcp://10.0.0.5:8786"),
        ("127.0.0.1:7233", "127.0.0.1:7233"),
        ("postgresql://u:p@w@db/x?sslmode=require", "postgresql://u:***@db/x?sslmode=require"),
    ],
)
def test_redact_url_hides_passwords_only(url: str, shown: str) -> None:
    assert redact_url(url) == shown


class OperationalError(Exception):
    """Named like kombu's: not an OSError, yet it means the broker is unreachable."""


class RedisError(Exception):
    pass


# Named as redis-py names it: derives from RedisError, not from the builtin.
RedisConnectionError = type("ConnectionError", (RedisError,), {})


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError("timed out"),
        socket.gaierror(-2, "Name or service not known"),
        OperationalError("Error 111 connecting to 127.0.0.1:6437. Connection refused."),
        RedisConnectionError("Error 111 connecting to 127.0.0.1:6437."),
    ],
)
def test_errors_that_mean_unreachable(error: Exception) -> None:
    assert _unreachable(error)


def test_an_error_raised_from_an_unreachable_one_counts() -> None:
    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except OSError as exc:
            raise RuntimeError("enqueue failed") from exc
    except RuntimeError as outer:
        assert _unreachable(outer)


@pytest.mark.parametrize(
    "error", [ValueError("bad option"), TypeError("cannot pickle"), FileNotFoundError(2, "x")]
)
def test_errors_that_are_not_about_reaching_the_backend(error: Exception) -> None:
    assert not _unreachable(error)


class _Named(LocalTransport):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name


def test_the_address_comes_from_the_first_key_an_adapter_reads() -> None:
    assert _backend_address(_Named("celery"), {"broker_url": "redis://:pw@h:1/0"}) == (
        "broker_url", "redis://:***@h:1/0")
    assert _backend_address(_Named("rq"), {"redis_url": "redis://h:2/3"}) == (
        "redis_url", "redis://h:2/3")
    assert _backend_address(_Named("dask"), {"address": "tcp://h:8786"}) == (
        "address", "tcp://h:8786")
    # Not set: the adapter's own key is named (the default applied).
    assert _backend_address(_Named("celery"), {}) == ("broker_url", None)
    assert _backend_address(_Named("process"), {}) == (None, None)


def test_backend_unavailable_error_is_a_connection_error_that_survives_pickling() -> None:
    error = BackendUnavailableError(
        "environment 'images' (celery): could not submit ...",
        environment="images", executor="celery", address="redis://h:1/0",
        setting="executor_config.broker_url",
    )
    assert isinstance(error, ConnectionError) and isinstance(error, WoveAdaptersError)
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error)
    assert (copy.environment, copy.executor, copy.address, copy.setting) == (
        "images", "celery", "redis://h:1/0", "executor_config.broker_url")
