"""A real Ray cluster for the tests, started with Ray's own CLI and kept off the network.

Ray 2.60 listens on all interfaces and advertises the machine's eth0 address whatever it
is told, so the tests never run it in the host's network namespace. Instead the pytest
process's main thread moves into a fresh network namespace that holds only a loopback
interface (``unshare(CLONE_NEWNET)``, then ``lo`` up), before the shared wove-adapters
loop or any Ray process starts. A network namespace belongs to a thread, and threads and
processes inherit it from the thread that creates them, so from then on the Ray head
(``ray start --head --block``), its workers, the Ray driver in this process and the
callback receiver all live on that namespace's 127.0.0.1: nothing can reach any other
address (there is no other interface). Redis and RabbitMQ on the host's loopback are out
of reach from inside; the Ray tests do not need them.

Entering a namespace needs CAP_SYS_ADMIN (root). Without it, run the whole session in
one: ``unshare -rn sh -c 'ip link set lo up && tox -e ray'``; a process that already sees
only ``lo`` is used as it is.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import secrets
import shutil
import socket
import struct
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
from services import ServiceProcess, free_port, poll_until, port_open

CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1


def _thread_netns() -> str:
    return f"/proc/self/task/{threading.get_native_id()}/ns/net"


def only_loopback() -> bool:
    return [name for _, name in socket.if_nameindex()] == ["lo"]


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sh", b"lo", 0) + b"\0" * 16
        flags = struct.unpack("16sh", fcntl.ioctl(sock, _SIOCGIFFLAGS, request)[:18])[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags | _IFF_UP) + b"\0" * 16)


@contextlib.contextmanager
def loopback_namespace() -> Iterator[str]:
    """Move this thread into a new loopback-only network namespace; move it back after.

    Yields the namespace's identity (``net:[inode]``). Threads started inside keep it."""
    if only_loopback():
        yield os.readlink(_thread_netns())
        return
    original = os.open(_thread_netns(), os.O_RDONLY)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        os.close(original)
        error = os.strerror(ctypes.get_errno())
        raise RuntimeError(
            f"cannot create a loopback-only network namespace for Ray ({error}); the Ray "
            f"tests keep Ray off the network this way. Run them as root, or inside one: "
            f"unshare -rn sh -c 'ip link set lo up && tox -e ray'"
        )
    try:
        _loopback_up()
        yield os.readlink(_thread_netns())
    finally:
        libc.setns(original, CLONE_NEWNET)
        os.close(original)


def shared_loop_netns() -> str | None:
    """The network namespace of the wove-adapters loop thread, if it is running."""
    from wove_adapters.core import loop as shared_loop

    thread = shared_loop._thread
    if thread is None or not thread.is_alive() or thread.native_id is None:
        return None
    return os.readlink(f"/proc/self/task/{thread.native_id}/ns/net")


def check_shared_loop(netns: str) -> None:
    loop_ns = shared_loop_netns()
    if loop_ns is not None and loop_ns != netns:
        raise RuntimeError(
            "the wove-adapters loop started outside the Ray tests' network namespace (an "
            "earlier test in this session used it); run the Ray tests in their own "
            "session: pytest tests/integration/ray (or tox -e ray)"
        )


def ray_cli() -> str:
    return str(Path(sys.executable).with_name("ray"))


def start_node(args: list[str], log: Path) -> ServiceProcess:
    """``ray start --block`` as a ``ServiceProcess``, not yet ready (``wait_until`` asks).

    Stopped by SIGTERM to the CLI's PID only: it drains the node and stops what it started
    (signalling the whole group instead kills the GCS first and the CLI then hangs). A CLI
    head may ignore SIGTERM for >10 s, hence the 20 s grace; whatever is left in its
    process group (its own session, so only what this node started) is SIGKILLed after."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    node = ServiceProcess(
        "ray head" if "--head" in args else "ray node",
        [ray_cli(), "start", "--block", "--disable-usage-stats", *args],
        log=log, env=env, grace=20.0,
    )
    return node.launch()


def wait_until(what: str, check: Callable[[], Any], node: ServiceProcess,
               timeout: float = 120.0) -> None:
    """Ask ``check`` until it holds; the node exiting first fails at once, with its log."""
    poll_until(check, timeout, f"the Ray node before {what}", alive=node.exited, interval=0.2)


@dataclass
class RayCluster:
    address: str
    head: ServiceProcess
    temp_dir: str
    netns: str


def use_session_token(directory: Path) -> Path:
    """Token authentication (Ray's default for new clusters) with a token of this
    session: ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH`` for the head, its
    workers, this driver and every subprocess; ``~/.ray/auth_token`` is never touched.
    Ray reads the mode when it is imported, so this runs before anything imports it."""
    if "ray" in sys.modules:
        raise RuntimeError("ray was imported before the Ray tests could configure its token")
    path = directory / "auth_token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(32))
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(path)})
    return path


@contextlib.contextmanager
def ray_cluster(log_dir: Path) -> Iterator[RayCluster]:
    """A head node (2 CPUs, a ``wove_probe`` resource) with the driver connected."""
    import ray

    with loopback_namespace() as netns:
        check_shared_loop(netns)
        port = free_port()
        # Short: Ray puts Unix sockets under it (108-byte path limit).
        temp_dir = tempfile.mkdtemp(prefix="wove-ray-", dir="/tmp")
        head = start_node(
            ["--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
             "--include-dashboard=false", f"--temp-dir={temp_dir}",
             f"--resources={json.dumps({'wove_probe': 4})}"],
            log_dir / "ray-head.log",
        )
        address = f"127.0.0.1:{port}"
        try:
            wait_until("the GCS port opens", lambda: port_open(port), head)
            ray.init(address=address, log_to_driver=False)
            wait_until("the head offers 2 CPUs",
                       lambda: ray.cluster_resources().get("CPU", 0) >= 2, head)
            yield RayCluster(address, head, temp_dir, netns)
        finally:
            with contextlib.suppress(Exception):
                ray.shutdown()
            head.stop()
            shutil.rmtree(temp_dir, ignore_errors=True)
