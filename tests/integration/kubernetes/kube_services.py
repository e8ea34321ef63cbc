"""Start, stop and inspect the Kubernetes API emulator (``kube_emulator.py``) for the tests.

``start_cluster`` runs it in its own session on 127.0.0.1 (a free port it picks itself),
waits until ``/version`` answers and writes a kubeconfig with a bearer token, so the
adapter connects exactly as it would to a real cluster. ``KubeCluster.api`` is raw HTTP
for assertions (what ``kubectl get -o json`` would show).
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "support"))
from services import ServiceError, ServiceProcess  # noqa: E402

NAMESPACE = "wove-test"
CAPACITY = 4  # Pods the emulated node runs at once; more wait Pending (a real queue)


@dataclass
class KubeCluster:
    url: str
    token: str
    kubeconfig: Path
    state_dir: Path
    service: ServiceProcess

    def config(self, **extra: Any) -> dict[str, Any]:
        """executor_config for the adapter: the kubeconfig, an image, and the env the
        worker Pods need on this host (the caller's data dir holds the signing key)."""
        return {
            "kubeconfig": str(self.kubeconfig),
            "image": "ghcr.io/example/wove-worker:py3.11",
            "python": sys.executable,
            "env": {"WOVE_ADAPTERS_HOME": os.environ["WOVE_ADAPTERS_HOME"]},
            **extra,
        }

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """Raw HTTP for test assertions (what kubectl would show)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method=method,
            headers={"Authorization": f"Bearer {self.token}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                raw = response.read()
                status = response.status
        except urllib.error.HTTPError as exc:
            raw, status = exc.read(), exc.code
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode()

    def jobs(self, namespace: str = NAMESPACE, selector: str = "") -> list[dict[str, Any]]:
        query = f"?labelSelector={urllib.parse.quote(selector)}" if selector else ""
        status, body = self.api("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs{query}")
        assert status == 200, body
        return list(body["items"])

    def pods(self, namespace: str = NAMESPACE, selector: str = "") -> list[dict[str, Any]]:
        query = f"?labelSelector={urllib.parse.quote(selector)}" if selector else ""
        status, body = self.api("GET", f"/api/v1/namespaces/{namespace}/pods{query}")
        assert status == 200, body
        return list(body["items"])


def _kubeconfig(path: Path, url: str, token: str) -> None:
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters:\n- name: wove-emulated\n  cluster:\n    server: {url}\n"
        f"users:\n- name: wove-test\n  user:\n    token: {token}\n"
        "contexts:\n- name: wove-test\n  context:\n    cluster: wove-emulated\n"
        f"    user: wove-test\n    namespace: {NAMESPACE}\n"
        "current-context: wove-test\n"
    )


def start_cluster(state_dir: Path) -> KubeCluster:
    """Start the emulator (its own session), wait until it answers, write a kubeconfig.
    Raises RuntimeError with the emulator's log when it does not come up."""
    token = secrets.token_hex(16)
    service = ServiceProcess(
        "the Kubernetes API emulator",
        [sys.executable, str(HERE / "kube_emulator.py"), "--state-dir", str(state_dir),
         "--capacity", str(CAPACITY), "--token", token, "--namespace", NAMESPACE,
         "--namespace", "wove-readonly", "--readonly-namespace", "wove-readonly"],
        log=state_dir / "emulator.log", ready=lambda: _answers(state_dir, token),
        ready_timeout=60,
    )
    try:
        service.start()
    except ServiceError as exc:
        raise RuntimeError(str(exc)) from None
    url = _answers(state_dir, token)
    kubeconfig = state_dir / "kubeconfig"
    _kubeconfig(kubeconfig, url, token)
    return KubeCluster(url=url, token=token, kubeconfig=kubeconfig, state_dir=state_dir,
                       service=service)


def _answers(state_dir: Path, token: str) -> str:
    """The emulator's URL once it wrote its port and answers ``/version``, else ""."""
    port_file = state_dir / "port"
    if not port_file.exists():
        return ""
    url = f"http://127.0.0.1:{port_file.read_text().strip()}"
    request = urllib.request.Request(url + "/version", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return url if response.status == 200 else ""


def stop_cluster(cluster: KubeCluster) -> None:
    """SIGTERM by PID; SIGKILL of its group (the Pods it runs) after 15 s."""
    cluster.service.stop()
