"""A Docker-Engine-API-compatible shim on a unix socket that runs "containers" as local
processes: the seam that lets moto's AWS Batch (docker mode) really run a job here, where
no container engine can start.

moto's batch backend drives Docker through the ``docker`` Python package:
``docker.from_env()`` (GET /version), ``containers.run(detach=True, ...)`` (POST
/containers/create, POST /containers/{id}/start, GET /containers/{id}/json),
``container.reload()`` / ``.status`` (GET .../json), ``container.logs(...)`` (GET
.../logs, multiplexed frames with timestamps), ``container.wait()`` (POST .../wait),
``container.kill()`` (POST .../kill, SIGKILL unless a signal is given) and
``container.remove()`` (DELETE /containers/{id}); ``images.get`` / ``images.pull`` are
answered too. A container's command (Entrypoint + Cmd) runs as a local process in its own
session with this shim's environment (standing in for the image's ENV) overlaid with the
container's ``Env``; the image is ignored. Exit codes follow Docker: a signal death is
128 + signal (137 for SIGKILL).

Run: ``python docker_engine_shim.py --socket /path/docker.sock [--log-dir DIR]
[--max-running N]`` (N processes at once, like a compute environment's capacity: the
rest read "running" but wait for a slot before their process starts); then
``DOCKER_HOST=unix:///path/docker.sock``. Stop it with SIGTERM: it kills what it started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import signal
import struct
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

API_VERSION = "1.44"
MIN_API_VERSION = "1.24"
STDOUT, STDERR = 1, 2
NEVER = "0001-01-01T00:00:00Z"


def _rfc3339(ts: float) -> str:
    moment = dt.datetime.fromtimestamp(ts, tz=dt.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Container:
    id: str
    name: str
    config: dict[str, Any]
    created: float = field(default_factory=time.time)
    status: str = "created"  # created | running | exited
    pid: int = 0
    exit_code: int = 0
    error: str = ""
    started_at: float = 0.0
    finished_at: float = 0.0
    logs: list[tuple[float, int, bytes]] = field(default_factory=list)
    proc: asyncio.subprocess.Process | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    readers: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def argv(self) -> list[str]:
        entry = self.config.get("Entrypoint") or []
        cmd = self.config.get("Cmd") or []
        if isinstance(entry, str):
            entry = [entry]
        if isinstance(cmd, str):
            cmd = [cmd]
        return [str(part) for part in (*entry, *cmd)]

    def inspect(self) -> dict[str, Any]:
        running = self.status == "running"
        return {
            "Id": self.id,
            "Name": "/" + self.name,
            "Created": _rfc3339(self.created),
            "Path": (self.argv or [""])[0],
            "Args": self.argv[1:],
            "Image": self.config.get("Image", ""),
            "State": {
                "Status": self.status,
                "Running": running,
                "Paused": False,
                "Restarting": False,
                "OOMKilled": False,
                "Dead": False,
                "Pid": self.pid if running else 0,
                "ExitCode": self.exit_code,
                "Error": self.error,
                "StartedAt": _rfc3339(self.started_at) if self.started_at else NEVER,
                "FinishedAt": _rfc3339(self.finished_at) if self.finished_at else NEVER,
            },
            "Config": {
                "Tty": False,
                "Image": self.config.get("Image", ""),
                "Cmd": self.config.get("Cmd"),
                "Entrypoint": self.config.get("Entrypoint"),
                "Env": self.config.get("Env") or [],
                "WorkingDir": self.config.get("WorkingDir") or "",
                "Labels": self.config.get("Labels") or {},
            },
            "HostConfig": {"LogConfig": {"Type": "json-file", "Config": {}}, "NetworkMode": "host"},
            "NetworkSettings": {
                "IPAddress": "127.0.0.1",
                "Networks": {"bridge": {"IPAddress": "127.0.0.1"}},
            },
            "Mounts": [],
        }

    def summary(self) -> dict[str, Any]:
        return {
            "Id": self.id,
            "Names": ["/" + self.name],
            "Image": self.config.get("Image", ""),
            "Command": " ".join(self.argv),
            "Created": int(self.created),
            "State": self.status,
            "Status": self.status,
            "Labels": self.config.get("Labels") or {},
        }


class Engine:
    """The containers this shim knows, and how to run, signal and wait for them."""

    def __init__(self, log_dir: Path | None, workdir: Path, max_running: int = 0) -> None:
        self.containers: dict[str, Container] = {}
        self.log_dir = log_dir
        self.workdir = workdir
        # Like a compute environment's capacity: ``start`` waits for a free slot.
        self.slots = asyncio.Semaphore(max_running) if max_running > 0 else None
        self._tasks: set[asyncio.Task[None]] = set()

    def find(self, ref: str) -> Container:
        ref = ref.lstrip("/")
        if ref in self.containers:
            return self.containers[ref]
        for container in self.containers.values():
            if container.name == ref:
                return container
        matches = [c for c in self.containers.values() if c.id.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        raise web.HTTPNotFound(
            text=json.dumps({"message": f"No such container: {ref}"}),
            content_type="application/json",
        )

    def create(self, name: str | None, config: dict[str, Any]) -> Container:
        if name and any(c.name == name for c in self.containers.values()):
            raise _error(409, f'Conflict. The container name "/{name}" is already in use')
        cid = hashlib.sha256(uuid.uuid4().bytes).hexdigest()
        container = Container(id=cid, name=name or f"shim_{cid[:12]}", config=config)
        self.containers[cid] = container
        return container

    async def start(self, container: Container) -> None:
        """Docker answers ``start`` once the process runs; with a capacity cap the
        container reads "running" at once and its process waits for a slot (like a
        container still initializing), so no client request blocks for long."""
        argv = container.argv
        env = dict(os.environ)
        for item in container.config.get("Env") or []:
            key, _, value = str(item).partition("=")
            env[key] = value
        problem = _unrunnable(argv, env)
        if problem:
            container.status, container.exit_code = "exited", 127
            container.error = f"exec failed: {problem}"
            container.finished_at = time.time()
            container.done.set()
            raise _error(400, f"failed to create task for container: {container.error}")
        container.started_at = time.time()
        container.status = "running"
        launch = self._launch(container, argv, env)
        if self.slots is None:
            await launch
        else:
            self._spawn(launch)

    async def _launch(self, container: Container, argv: list[str], env: dict[str, str]) -> None:
        if self.slots is not None:
            await self.slots.acquire()
        if container.status != "running":  # killed while it waited for a slot
            self._free_slot()
            return
        try:
            container.proc = await asyncio.create_subprocess_exec(
                *argv,
                env=env,
                cwd=container.config.get("WorkingDir") or str(self.workdir),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            self._free_slot()
            self._exited(container, 127, f"exec failed: {exc}")
            return
        container.pid = container.proc.pid
        assert container.proc.stdout is not None and container.proc.stderr is not None
        container.readers = [
            asyncio.create_task(self._read(container, container.proc.stdout, STDOUT)),
            asyncio.create_task(self._read(container, container.proc.stderr, STDERR)),
        ]
        self._spawn(self._reap(container))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _free_slot(self) -> None:
        if self.slots is not None:
            self.slots.release()

    def _exited(self, container: Container, code: int, error: str = "") -> None:
        container.exit_code = code
        container.error = error
        container.finished_at = time.time()
        container.status = "exited"
        container.done.set()

    async def _read(self, container: Container, stream: asyncio.StreamReader, kind: int) -> None:
        sink = None
        if self.log_dir is not None:
            sink = (self.log_dir / f"{container.name}.log").open("ab")
        try:
            while True:
                line = await stream.readline()
                if not line:
                    return
                container.logs.append((time.time(), kind, line))
                if sink is not None:
                    sink.write(line)
                    sink.flush()
        finally:
            if sink is not None:
                sink.close()

    async def _reap(self, container: Container) -> None:
        assert container.proc is not None
        code = await container.proc.wait()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*container.readers), 5)
        self._free_slot()
        self._exited(container, code if code >= 0 else 128 - code)

    def signal(self, container: Container, signum: int) -> None:
        if container.status != "running":
            raise _error(409, f"Container {container.id} is not running")
        if container.proc is None:  # still waiting for a slot: it never runs
            self._exited(container, 128 + signum, f"killed by signal {signum} before it ran")
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(container.proc.pid, signum)

    async def stop(self, container: Container, grace: float) -> None:
        if container.status != "running":
            return
        self.signal(container, signal.SIGTERM)
        try:
            await asyncio.wait_for(container.done.wait(), grace)
        except asyncio.TimeoutError:
            with contextlib.suppress(web.HTTPException):
                self.signal(container, signal.SIGKILL)
            await container.done.wait()

    async def shutdown(self) -> None:
        for container in self.containers.values():
            if container.status == "running":
                with contextlib.suppress(web.HTTPException):
                    self.signal(container, signal.SIGKILL)
        for container in self.containers.values():
            if container.proc is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(container.done.wait(), 5)


def _unrunnable(argv: list[str], env: dict[str, str]) -> str:
    """Why exec would fail (Docker reports it from ``start``), or ''."""
    if not argv:
        return "no command: the container has neither Entrypoint nor Cmd"
    program = argv[0]
    if "/" in program:
        return "" if os.access(program, os.X_OK) else f"{program}: no such file or directory"
    found = shutil.which(program, path=env.get("PATH"))
    return "" if found else f'"{program}": executable file not found in $PATH'


def _error(status: int, message: str) -> web.HTTPException:
    cls = {400: web.HTTPBadRequest, 404: web.HTTPNotFound, 409: web.HTTPConflict}.get(
        status, web.HTTPInternalServerError
    )
    return cls(text=json.dumps({"message": message}), content_type="application/json")


def _flag(request: web.Request, name: str, default: bool = False) -> bool:
    value = request.query.get(name)
    if value is None:
        return default
    return value.lower() in ("1", "true", "yes")


def _signal_number(raw: str | None) -> int:
    if not raw:
        return int(signal.SIGKILL)
    if raw.isdigit():
        return int(raw)
    name = raw.upper()
    return int(getattr(signal, name if name.startswith("SIG") else "SIG" + name))


def _frame(kind: int, data: bytes) -> bytes:
    return struct.pack(">BxxxL", kind, len(data)) + data


# ---------------------------------------------------------------- routes


def build_app(engine: Engine) -> web.Application:
    routes: list[tuple[str, re.Pattern[str], Any]] = []

    def route(method: str, pattern: str) -> Any:
        def register(handler: Any) -> Any:
            routes.append((method, re.compile(f"^(?:/v[0-9.]+)?{pattern}$"), handler))
            return handler

        return register

    @route("GET", "/_ping")
    @route("HEAD", "/_ping")
    async def ping(request: web.Request) -> web.StreamResponse:
        return web.Response(text="OK", headers={"Api-Version": API_VERSION})

    @route("GET", "/version")
    async def version(request: web.Request) -> web.StreamResponse:
        return web.json_response({
            "Version": "24.0.0-wove-shim", "ApiVersion": API_VERSION,
            "MinAPIVersion": MIN_API_VERSION, "Os": "linux", "Arch": "amd64",
            "Components": [{"Name": "Engine", "Version": "24.0.0-wove-shim"}],
        })

    @route("GET", "/info")
    async def info(request: web.Request) -> web.StreamResponse:
        running = sum(c.status == "running" for c in engine.containers.values())
        return web.json_response({
            "ID": "wove-shim", "Containers": len(engine.containers),
            "ContainersRunning": running, "OperatingSystem": "wove docker engine shim",
            "NCPU": os.cpu_count() or 1, "ServerVersion": "24.0.0-wove-shim",
        })

    def image_info(name: str) -> dict[str, Any]:
        digest = hashlib.sha256(name.encode()).hexdigest()
        return {"Id": f"sha256:{digest}", "RepoTags": [name], "Created": _rfc3339(time.time())}

    @route("GET", "/images/(?P<name>.+)/json")
    async def image_get(request: web.Request, name: str) -> web.StreamResponse:
        return web.json_response(image_info(name))

    @route("POST", "/images/create")
    async def image_pull(request: web.Request) -> web.StreamResponse:
        image = request.query.get("fromImage", "")
        tag = request.query.get("tag", "latest")
        lines = [
            {"status": f"Pulling from {image}", "id": tag},
            {"status": f"Status: Image is up to date for {image}:{tag} (the shim ignores images)"},
        ]
        body = "".join(json.dumps(line) + "\r\n" for line in lines)
        return web.Response(text=body, content_type="application/json")

    @route("GET", "/containers/json")
    async def container_list(request: web.Request) -> web.StreamResponse:
        show_all = _flag(request, "all")
        return web.json_response([
            c.summary() for c in engine.containers.values() if show_all or c.status == "running"
        ])

    @route("POST", "/containers/create")
    async def container_create(request: web.Request) -> web.StreamResponse:
        config = await request.json()
        container = engine.create(request.query.get("name"), config)
        return web.json_response({"Id": container.id, "Warnings": []}, status=201)

    @route("POST", "/containers/(?P<ref>[^/]+)/start")
    async def container_start(request: web.Request, ref: str) -> web.StreamResponse:
        container = engine.find(ref)
        if container.status != "created":
            return web.Response(status=304)
        await engine.start(container)
        return web.Response(status=204)

    @route("GET", "/containers/(?P<ref>[^/]+)/json")
    async def container_inspect(request: web.Request, ref: str) -> web.StreamResponse:
        return web.json_response(engine.find(ref).inspect())

    @route("POST", "/containers/(?P<ref>[^/]+)/wait")
    async def container_wait(request: web.Request, ref: str) -> web.StreamResponse:
        container = engine.find(ref)
        if container.status == "created" and request.query.get("condition") != "next-exit":
            # Docker's default condition "not-running" answers at once for a created one.
            return web.json_response({"StatusCode": 0, "Error": None})
        await container.done.wait()
        return web.json_response({"StatusCode": container.exit_code, "Error": None})

    @route("GET", "/containers/(?P<ref>[^/]+)/logs")
    async def container_logs(request: web.Request, ref: str) -> web.StreamResponse:
        container = engine.find(ref)
        want = {STDOUT} if _flag(request, "stdout") else set()
        if _flag(request, "stderr"):
            want.add(STDERR)
        since = float(request.query.get("since") or 0)
        until = float(request.query.get("until") or 0)
        stamps = _flag(request, "timestamps")
        entries = [
            (ts, kind, line)
            for ts, kind, line in container.logs
            if kind in want and ts >= since and (not until or ts <= until)
        ]
        tail = request.query.get("tail", "all")
        if tail.isdigit():
            entries = entries[-int(tail):] if int(tail) else []
        body = b"".join(
            _frame(kind, (_rfc3339(ts).encode() + b" " if stamps else b"") + line)
            for ts, kind, line in entries
        )
        return web.Response(body=body, content_type="application/vnd.docker.raw-stream")

    @route("POST", "/containers/(?P<ref>[^/]+)/kill")
    async def container_kill(request: web.Request, ref: str) -> web.StreamResponse:
        container = engine.find(ref)
        engine.signal(container, _signal_number(request.query.get("signal")))
        return web.Response(status=204)

    @route("POST", "/containers/(?P<ref>[^/]+)/stop")
    async def container_stop(request: web.Request, ref: str) -> web.StreamResponse:
        container = engine.find(ref)
        if container.status != "running":
            return web.Response(status=304)
        await engine.stop(container, float(request.query.get("t") or 10))
        return web.Response(status=204)

    @route("DELETE", "/containers/(?P<ref>[^/]+)")
    async def container_remove(request: web.Request, ref: str) -> web.StreamResponse:
        container = engine.find(ref)
        if container.status == "running":
            if not _flag(request, "force"):
                raise _error(409, f"You cannot remove a running container {container.id}")
            engine.signal(container, signal.SIGKILL)
            await container.done.wait()
        engine.containers.pop(container.id, None)
        return web.Response(status=204)

    async def dispatch(request: web.Request) -> web.StreamResponse:
        path = request.path
        for method, pattern, handler in routes:
            if request.method != method:
                continue
            match = pattern.match(path)
            if match:
                return await handler(request, **match.groupdict())  # type: ignore[no-any-return]
        raise _error(404, f"page not found: {request.method} {path} (not emulated by the shim)")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", dispatch)

    async def on_shutdown(app: web.Application) -> None:
        await engine.shutdown()

    app.on_shutdown.append(on_shutdown)
    return app


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


async def serve(socket_path: Path, log_dir: Path | None, max_running: int = 0) -> None:
    workdir = Path(os.environ.get("WOVE_SHIM_WORKDIR") or socket_path.parent)
    if log_dir is not None:
        os.makedirs(log_dir, exist_ok=True)
    engine = Engine(log_dir, workdir, max_running)
    runner = web.AppRunner(build_app(engine), access_log=None)
    await runner.setup()
    _unlink(socket_path)
    # moto opens a new client per job: a 1000-child array job connects 1000 times at once.
    site = web.UnixSite(runner, str(socket_path), backlog=4096)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"docker engine shim listening on unix://{socket_path}", flush=True)
    await stop.wait()
    await engine.shutdown()  # first, so pending waits answer and the server can close
    await runner.cleanup()
    _unlink(socket_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--socket", required=True, type=Path)
    parser.add_argument("--log-dir", type=Path, default=None)
    parser.add_argument("--max-running", type=int, default=0,
                        help="containers running at once; more wait in start (0: no limit)")
    options = parser.parse_args(argv)
    asyncio.run(serve(options.socket, options.log_dir, options.max_running))
    return 0


if __name__ == "__main__":
    sys.exit(main())
