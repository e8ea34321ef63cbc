"""A small Kubernetes API emulator with a Job controller, for the tests only.

No kube-apiserver, kind, k3s or container runtime can run on the test machines, so this
process stands in for a one-node cluster. It serves, over plain HTTP on 127.0.0.1, exactly
the endpoints the real ``kubernetes`` client uses for the Job life cycle:

- ``/apis/batch/v1/namespaces/{ns}/jobs[/{name}]``: POST (also ``dryRun=All``), GET,
  LIST (label and field selectors), PATCH (merge / strategic merge / JSON patch), DELETE
  (``propagationPolicy`` as a query parameter or in DeleteOptions; the batch/v1 default
  is ``Orphan``, as on a real API server)
- ``/api/v1/namespaces/{ns}/pods[/{name}[/log]]``: LIST, GET, DELETE, logs
- ``/api/v1/namespaces[/{ns}]``, ``/api/v1/namespaces/{ns}/secrets[/{name}]``, ``/version``

Validation follows the API server where the adapter could get it wrong: object names are
RFC 1123 labels of at most 63 characters, label keys and values obey the label rules,
creating an existing name is ``409 AlreadyExists``, a missing namespace is ``404``.

The controller runs in the same process. For every Job it creates Pods (label
``job-name``; one per completion index with ``JOB_COMPLETION_INDEX`` for Indexed Jobs),
schedules them onto one node with ``--capacity`` slots, runs each container's command as
a local process with the container's environment (``$(VAR)`` references expanded as the
kubelet does), and moves Pod phases and Job status (active/ready/succeeded/failed,
completedIndexes/failedIndexes, conditions Complete/Failed, backoffLimit,
backoffLimitPerIndex, activeDeadlineSeconds, ttlSecondsAfterFinished). Images are not
pulled: an image whose registry host ends in ``.invalid`` stays in ImagePullBackOff, every
other image "contains" the host's filesystem. A command that cannot be executed fails
the Pod with ``StartError`` (exit code 128), as containerd does.

Run: ``python kube_emulator.py --state-dir DIR [--port 0] [--capacity 4] [--token T]``;
the chosen port is written to ``DIR/port`` once the server accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import copy
import json
import os
import re
import secrets
import shutil
import signal
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from aiohttp import web

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
VAR_REF = re.compile(r"\$\$|\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)")
INDEX_KEY = "batch.kubernetes.io/job-completion-index"
MAX_INT32 = 2147483647
LABEL_RULE = (
    "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an "
    "alphanumeric character, at most 63 characters"
)
LABEL_MSG = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', "
    "and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', "
    "regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def response(self) -> web.Response:
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return web.json_response(body, status=self.code)


# ---------------------------------------------------------------- selectors


def parse_label_selector(text: str) -> list[tuple[str, str, list[str]]]:
    """Equality- and set-based requirements: a=b, a==b, a!=b, a, !a, a in (x,y), a notin (x)."""
    requirements: list[tuple[str, str, list[str]]] = []
    parts = re.findall(r"[^,(]+(?:\([^)]*\))?", text or "")
    for raw in parts:
        part = raw.strip()
        if not part:
            continue
        match = re.match(r"^(\S+)\s+(in|notin)\s+\((.*)\)$", part)
        if match:
            values = [v.strip() for v in match.group(3).split(",") if v.strip()]
            requirements.append((match.group(1), match.group(2), values))
        elif "!=" in part:
            key, value = part.split("!=", 1)
            requirements.append((key.strip(), "!=", [value.strip()]))
        elif "=" in part:
            key, value = re.split(r"==?", part, maxsplit=1)
            requirements.append((key.strip(), "=", [value.strip()]))
        elif part.startswith("!"):
            requirements.append((part[1:].strip(), "!exists", []))
        else:
            requirements.append((part, "exists", []))
    return requirements


def labels_match(labels: dict[str, str], selector: str) -> bool:
    for key, op, values in parse_label_selector(selector):
        present = key in labels
        value = labels.get(key)
        if op == "=" and value != values[0]:
            return False
        if op == "!=" and value == values[0]:
            return False
        if op == "in" and value not in values:
            return False
        if op == "notin" and present and value in values:
            return False
        if op == "exists" and not present:
            return False
        if op == "!exists" and present:
            return False
    return True


def field_value(obj: dict[str, Any], path: str) -> Any:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


SUPPORTED_FIELDS = {
    "jobs": {"metadata.name", "metadata.namespace", "status.successful"},
    "pods": {
        "metadata.name",
        "metadata.namespace",
        "status.phase",
        "spec.nodeName",
        "spec.restartPolicy",
        "spec.serviceAccountName",
        "status.podIP",
    },
    "secrets": {"metadata.name", "metadata.namespace", "type"},
}


def fields_match(kind: str, obj: dict[str, Any], selector: str) -> bool:
    for raw in (selector or "").split(","):
        part = raw.strip()
        if not part:
            continue
        negate = "!=" in part
        key, value = re.split(r"!=|==?", part, maxsplit=1)
        key = key.strip()
        if key not in SUPPORTED_FIELDS[kind]:
            raise ApiError(
                400,
                "BadRequest",
                f'"{key}" is not a known field selector: only "'
                + '", "'.join(sorted(SUPPORTED_FIELDS[kind]))
                + '"',
            )
        actual = field_value(obj, "status.succeeded" if key == "status.successful" else key)
        actual = "" if actual is None else str(actual)
        if (actual == value.strip()) == negate:
            return False
    return True


# ---------------------------------------------------------------- validation


def check_name(kind: str, name: str, field: str = "metadata.name") -> None:
    if not name:
        raise ApiError(
            422,
            "Invalid",
            f"{kind} is invalid: {field}: Required value: name or generateName is required",
        )
    if len(name) > 63 or not DNS1123_LABEL.match(name):
        detail = "must be no more than 63 characters" if len(name) > 63 else LABEL_MSG
        raise ApiError(
            422,
            "Invalid",
            f'{kind} "{name}" is invalid: {field}: Invalid value: "{name}": {detail}',
        )


def check_labels(kind: str, name: str, labels: dict[str, Any], field: str) -> None:
    for key, value in (labels or {}).items():
        prefix, _, short = key.rpartition("/")
        if prefix and (len(prefix) > 253 or not DNS1123_SUBDOMAIN.match(prefix)):
            raise ApiError(
                422,
                "Invalid",
                f'{kind} "{name}" is invalid: {field}: Invalid value: "{key}": '
                "prefix part must be a lowercase RFC 1123 subdomain",
            )
        if not short or len(short) > 63 or not LABEL_VALUE.match(short):
            raise ApiError(
                422,
                "Invalid",
                f'{kind} "{name}" is invalid: {field}: Invalid value: "{key}": name part '
                f"{LABEL_RULE}",
            )
        if not isinstance(value, str) or len(value) > 63 or not LABEL_VALUE.match(value):
            raise ApiError(
                422,
                "Invalid",
                f'{kind} "{name}" is invalid: {field}: Invalid value: "{value}": a valid label '
                f"must be an empty string or {LABEL_RULE}",
            )


def validate_job(job: dict[str, Any]) -> None:
    meta = job.setdefault("metadata", {})
    name = meta.get("name", "")
    check_name("Job.batch", name)
    kind = f'Job.batch "{name}"'
    check_labels("Job.batch", name, meta.get("labels") or {}, "metadata.labels")
    spec = job.get("spec") or {}
    template = spec.get("template") or {}
    check_labels(
        "Job.batch",
        name,
        (template.get("metadata") or {}).get("labels") or {},
        "spec.template.metadata.labels",
    )
    pod_spec = template.get("spec") or {}
    containers = pod_spec.get("containers") or []
    if not containers:
        raise ApiError(
            422, "Invalid", f"{kind} is invalid: spec.template.spec.containers: Required value"
        )
    if pod_spec.get("restartPolicy") not in ("Never", "OnFailure"):
        raise ApiError(
            422,
            "Invalid",
            f"{kind} is invalid: spec.template.spec.restartPolicy: Required value: "
            'valid values: "OnFailure", "Never"',
        )
    for i, container in enumerate(containers):
        where = f"spec.template.spec.containers[{i}]"
        if not container.get("name") or not DNS1123_LABEL.match(container["name"]):
            raise ApiError(
                422,
                "Invalid",
                f"{kind} is invalid: {where}.name: Invalid value: "
                f"{container.get('name')!r}: {LABEL_MSG}",
            )
        if not container.get("image"):
            raise ApiError(422, "Invalid", f"{kind} is invalid: {where}.image: Required value")
        for env in container.get("env") or []:
            if not ENV_NAME.match(env.get("name", "")):
                raise ApiError(
                    422,
                    "Invalid",
                    f"{kind} is invalid: {where}.env.name: Invalid value: {env.get('name')!r}",
                )
    mode = spec.get("completionMode") or "NonIndexed"
    if mode not in ("NonIndexed", "Indexed"):
        raise ApiError(
            422, "Invalid", f'{kind} is invalid: spec.completionMode: Unsupported value: "{mode}"'
        )
    if mode == "Indexed" and not spec.get("completions"):
        raise ApiError(
            422,
            "Invalid",
            f"{kind} is invalid: spec.completions: Required value: when completion mode is Indexed",
        )
    if spec.get("backoffLimitPerIndex") is not None and mode != "Indexed":
        raise ApiError(
            422,
            "Invalid",
            f"{kind} is invalid: spec.backoffLimitPerIndex: Forbidden: "
            "requires indexed completion mode",
        )
    for key in (
        "parallelism",
        "completions",
        "backoffLimit",
        "ttlSecondsAfterFinished",
        "activeDeadlineSeconds",
        "backoffLimitPerIndex",
    ):
        value = spec.get(key)
        if value is not None and (not isinstance(value, int) or value < 0):
            raise ApiError(
                422,
                "Invalid",
                f"{kind} is invalid: spec.{key}: Invalid value: {value}: "
                "must be greater than or equal to 0",
            )


def default_job(job: dict[str, Any], namespace: str) -> dict[str, Any]:
    job = copy.deepcopy(job)
    job["apiVersion"], job["kind"] = "batch/v1", "Job"
    meta = job.setdefault("metadata", {})
    uid = str(uuid.uuid4())
    meta.update(namespace=namespace, uid=uid, creationTimestamp=now_iso(), generation=1)
    meta.setdefault("labels", {})
    spec = job.setdefault("spec", {})
    spec.setdefault("parallelism", 1)
    spec.setdefault("completions", 1)
    spec.setdefault("completionMode", "NonIndexed")
    spec.setdefault("suspend", False)
    spec.setdefault("podReplacementPolicy", "TerminatingOrFailed")
    spec.setdefault(
        "backoffLimit", MAX_INT32 if spec.get("backoffLimitPerIndex") is not None else 6
    )
    own = {
        "batch.kubernetes.io/controller-uid": uid,
        "batch.kubernetes.io/job-name": meta["name"],
        "controller-uid": uid,
        "job-name": meta["name"],
    }
    spec["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
    template = spec.setdefault("template", {})
    tmeta = template.setdefault("metadata", {})
    tmeta["labels"] = {**(tmeta.get("labels") or {}), **own}
    for key in ("job-name", "controller-uid"):
        meta["labels"].setdefault(key, own[key])
    meta["labels"].setdefault("batch.kubernetes.io/job-name", meta["name"])
    meta["labels"].setdefault("batch.kubernetes.io/controller-uid", uid)
    pod_spec = template.setdefault("spec", {})
    pod_spec.setdefault("terminationGracePeriodSeconds", 30)
    pod_spec.setdefault("serviceAccountName", "default")
    pod_spec.setdefault("dnsPolicy", "ClusterFirst")
    job["status"] = {}
    return job


# ---------------------------------------------------------------- index sets


def compress(indexes: set[int]) -> str:
    """{0,1,2,5} -> "0-2,5" (the Job status format)."""
    out: list[str] = []
    ordered = sorted(indexes)
    start = prev = None
    for i in ordered:
        if start is None:
            start = prev = i
        elif i == prev + 1:  # type: ignore[operator]
            prev = i
        else:
            out.append(f"{start}-{prev}" if start != prev else f"{start}")
            start = prev = i
    if start is not None:
        out.append(f"{start}-{prev}" if start != prev else f"{start}")
    return ",".join(out)


# ---------------------------------------------------------------- the cluster


class Cluster:
    def __init__(self, state_dir: Path, capacity: int, readonly: set[str], namespaces: set[str]):
        self.state_dir = state_dir
        self.capacity = capacity
        self.readonly = readonly
        self.namespaces: dict[str, dict[str, Any]] = {}
        for ns in namespaces | {"default", "kube-system"}:
            self.namespaces[ns] = self._namespace(ns)
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.secrets: dict[tuple[str, str], dict[str, Any]] = {}
        self.procs: dict[tuple[str, str], asyncio.subprocess.Process] = {}
        self.kill_timers: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self.job_state: dict[str, dict[str, Any]] = {}  # uid -> controller bookkeeping
        self.by_owner: dict[str, set[tuple[str, str]]] = {}  # job uid -> its pods
        self.queue: list[tuple[str, str]] = []  # pending pods, FIFO
        self.version = 1000
        self.wake = asyncio.Event()
        self.requests: dict[str, int] = {}
        (state_dir / "logs").mkdir(parents=True, exist_ok=True)
        (state_dir / "pods").mkdir(parents=True, exist_ok=True)

    def _namespace(self, name: str) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": name,
                "uid": str(uuid.uuid4()),
                "creationTimestamp": now_iso(),
                "labels": {"kubernetes.io/metadata.name": name},
            },
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        }

    def bump(self, obj: dict[str, Any]) -> None:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        self.wake.set()

    def need_namespace(self, ns: str) -> None:
        if ns not in self.namespaces:
            raise ApiError(
                404, "NotFound", f'namespaces "{ns}" not found', {"name": ns, "kind": "namespaces"}
            )

    # ------------------------------------------------------------ jobs

    def create_job(self, ns: str, body: dict[str, Any], dry_run: bool) -> dict[str, Any]:
        self.need_namespace(ns)
        if ns in self.readonly:
            raise ApiError(
                403,
                "Forbidden",
                f'jobs.batch is forbidden: User "system:serviceaccount:{ns}:wove" '
                f'cannot create resource "jobs" in API group "batch" in the namespace "{ns}"',
                {"group": "batch", "kind": "jobs"},
            )
        meta = body.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
        if meta.get("namespace") not in (None, ns):
            raise ApiError(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent "
                "on the request",
            )
        validate_job(body)
        name = meta["name"]
        if (ns, name) in self.jobs:
            raise ApiError(
                409,
                "AlreadyExists",
                f'jobs.batch "{name}" already exists',
                {"name": name, "group": "batch", "kind": "jobs"},
            )
        job = default_job(body, ns)
        if dry_run:
            job["metadata"]["resourceVersion"] = ""
            return job
        self.jobs[(ns, name)] = job
        self.job_state[job["metadata"]["uid"]] = {
            "failures": {},
            "succeeded": set(),
            "failed": 0,
            "done_indexes": set(),
            "failed_indexes": set(),
            "succeeded_count": 0,
        }
        self.bump(job)
        return job

    def get_job(self, ns: str, name: str) -> dict[str, Any]:
        job = self.jobs.get((ns, name))
        if job is None:
            raise ApiError(
                404,
                "NotFound",
                f'jobs.batch "{name}" not found',
                {"name": name, "group": "batch", "kind": "jobs"},
            )
        return job

    def delete_job(
        self, ns: str, name: str, policy: str | None, dry_run: bool
    ) -> tuple[int, dict[str, Any]]:
        job = self.get_job(ns, name)
        policy = policy or "Orphan"  # the batch/v1 REST default, unlike kubectl's
        if policy not in ("Orphan", "Background", "Foreground"):
            raise ApiError(400, "BadRequest", f'propagationPolicy "{policy}" is not supported')
        uid = job["metadata"]["uid"]
        status = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": {"name": name, "group": "batch", "kind": "jobs", "uid": uid},
        }
        if dry_run:
            return 200, status
        owned = self.owned_pods(uid)
        if policy == "Foreground":
            job["metadata"]["deletionTimestamp"] = now_iso()
            job["metadata"]["finalizers"] = ["foregroundDeletion"]
            self.bump(job)
            for pod in owned:
                self.delete_pod(pod, grace=None, by_controller=True)
            self._maybe_finish_foreground(job)
            return 200, job
        del self.jobs[(ns, name)]
        self.version += 1
        self.wake.set()
        for pod in owned:
            if policy == "Orphan":
                pod["metadata"].pop("ownerReferences", None)
                self.bump(pod)
            else:
                self.delete_pod(pod, grace=None, by_controller=True)
        return 200, status

    def _maybe_finish_foreground(self, job: dict[str, Any]) -> None:
        meta = job["metadata"]
        if meta.get("deletionTimestamp") and not self.owned_pods(meta["uid"]):
            self.jobs.pop((meta["namespace"], meta["name"]), None)
            self.wake.set()

    def patch_job(self, ns: str, name: str, content_type: str, patch: Any) -> dict[str, Any]:
        job = self.get_job(ns, name)
        if content_type.startswith("application/json-patch+json"):
            patched = json_patch(copy.deepcopy(job), patch)
        else:
            patched = merge_patch(copy.deepcopy(job), patch)
        for key in ("name", "namespace", "uid", "creationTimestamp"):
            patched["metadata"][key] = job["metadata"][key]
        check_labels("Job.batch", name, patched["metadata"].get("labels") or {}, "metadata.labels")
        if patched["spec"].get("template") != job["spec"].get("template"):
            raise ApiError(
                422,
                "Invalid",
                f'Job.batch "{name}" is invalid: spec.template: Invalid value: field is immutable',
            )
        patched["metadata"]["generation"] = job["metadata"].get("generation", 1) + (
            patched["spec"] != job["spec"]
        )
        self.jobs[(ns, name)] = patched
        self.bump(patched)
        return patched

    # ------------------------------------------------------------ pods

    def owned_pods(self, uid: str) -> list[dict[str, Any]]:
        keys = self.by_owner.get(uid) or set()
        return [
            self.pods[k]
            for k in sorted(keys)
            if k in self.pods
            and any(
                r.get("uid") == uid for r in self.pods[k]["metadata"].get("ownerReferences") or []
            )
        ]

    def get_pod(self, ns: str, name: str) -> dict[str, Any]:
        pod = self.pods.get((ns, name))
        if pod is None:
            raise ApiError(
                404, "NotFound", f'pods "{name}" not found', {"name": name, "kind": "pods"}
            )
        return pod

    def new_pod(self, job: dict[str, Any], index: int | None) -> None:
        jmeta, spec = job["metadata"], job["spec"]
        template = copy.deepcopy(spec["template"])
        base = jmeta["name"] if index is None else f"{jmeta['name']}-{index}"
        name = f"{base[:57]}-{secrets.token_hex(3)[:5]}"
        labels = dict(template.get("metadata", {}).get("labels") or {})
        annotations = dict(template.get("metadata", {}).get("annotations") or {})
        pod_spec = template["spec"]
        if index is not None:
            labels[INDEX_KEY] = str(index)
            annotations[INDEX_KEY] = str(index)
            for container in pod_spec["containers"]:
                container.setdefault("env", []).append(
                    {
                        "name": "JOB_COMPLETION_INDEX",
                        "valueFrom": {
                            "fieldRef": {
                                "apiVersion": "v1",
                                "fieldPath": f"metadata.annotations['{INDEX_KEY}']",
                            }
                        },
                    }
                )
            pod_spec.setdefault("hostname", base[:63])
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": jmeta["namespace"],
                "uid": str(uuid.uuid4()),
                "creationTimestamp": now_iso(),
                "labels": labels,
                "annotations": annotations,
                "generateName": f"{base}-",
                "finalizers": ["batch.kubernetes.io/job-tracking"],
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": jmeta["name"],
                        "uid": jmeta["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": pod_spec,
            "status": {
                "phase": "Pending",
                "qosClass": "BestEffort",
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "0/1 nodes are available: 1 Insufficient pods.",
                        "lastTransitionTime": now_iso(),
                    }
                ],
            },
        }
        self.pods[(jmeta["namespace"], name)] = pod
        self.by_owner.setdefault(jmeta["uid"], set()).add((jmeta["namespace"], name))
        self.queue.append((jmeta["namespace"], name))
        self.bump(pod)

    def delete_pod(
        self, pod: dict[str, Any], grace: int | None, by_controller: bool = False
    ) -> None:
        meta = pod["metadata"]
        key = (meta["namespace"], meta["name"])
        if grace is None:
            grace = int(pod["spec"].get("terminationGracePeriodSeconds", 30))
        if not by_controller:
            meta["labels"]["wove-emulator/deleted-by-user"] = "true"
        proc = self.procs.get(key)
        if proc is not None and proc.returncode is None:
            if pod["status"].get("phase") != "Succeeded":
                self._account(pod)  # a terminating, unfinished Pod already counts as failed
            if not meta.get("deletionTimestamp"):
                meta["deletionTimestamp"] = now_iso()
                meta["deletionGracePeriodSeconds"] = grace
                self.bump(pod)
                with contextlib.suppress(ProcessLookupError):
                    if grace == 0:
                        os.killpg(proc.pid, signal.SIGKILL)
                    else:
                        os.kill(proc.pid, signal.SIGTERM)
                loop = asyncio.get_running_loop()
                self.kill_timers[key] = loop.call_later(grace, self._kill, key)
            return
        self._remove_pod(pod)

    def _kill(self, key: tuple[str, str]) -> None:
        proc = self.procs.get(key)
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

    def _remove_pod(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        key = (meta["namespace"], meta["name"])
        if key in self.queue:
            self.queue.remove(key)
        self._account(pod)
        self.pods.pop(key, None)
        for ref in meta.get("ownerReferences") or []:
            self.by_owner.get(ref.get("uid"), set()).discard(key)
        timer = self.kill_timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        self.version += 1
        self.wake.set()
        for job in list(self.jobs.values()):
            self._maybe_finish_foreground(job)

    def _account(self, pod: dict[str, Any]) -> None:
        """Count a Pod's outcome once for its Job; a Pod that goes away unfinished failed."""
        meta = pod["metadata"]
        if meta.get("annotations", {}).get("wove-emulator/counted"):
            return
        meta.setdefault("annotations", {})["wove-emulator/counted"] = "true"
        owner = next((r for r in meta.get("ownerReferences") or [] if r.get("controller")), None)
        if owner is None:
            return
        state = self.job_state.get(owner["uid"])
        if state is None:
            return
        index = meta.get("annotations", {}).get(INDEX_KEY)
        if pod["status"].get("phase") == "Succeeded":
            state["succeeded_count"] += 1
            if index is not None:
                state["done_indexes"].add(int(index))
        else:
            state["failed"] += 1
            if index is not None:
                state["failures"][int(index)] = state["failures"].get(int(index), 0) + 1

    # ------------------------------------------------------------ running containers

    def _schedule(self) -> None:
        running = sum(
            1
            for p in self.pods.values()
            if p["spec"].get("nodeName") and p["status"]["phase"] in ("Pending", "Running")
        )
        while self.queue and running < self.capacity:
            key = self.queue.pop(0)
            pod = self.pods.get(key)
            if pod is None or pod["metadata"].get("deletionTimestamp"):
                continue
            pod["spec"]["nodeName"] = "wove-emulated-node"
            pod["status"].update(hostIP="127.0.0.1", podIP="127.0.0.1", startTime=now_iso())
            pod["status"]["conditions"] = [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now_iso()}
            ]
            running += 1
            self.bump(pod)
            asyncio.get_running_loop().create_task(self._start(pod))

    def _container_env(self, pod: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOME": "/root",
            "HOSTNAME": pod["spec"].get("hostname") or pod["metadata"]["name"],
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        }
        meta = pod["metadata"]
        for source in container.get("envFrom") or []:
            ref = source.get("secretRef")
            if ref:
                secret = self.secrets.get((meta["namespace"], ref["name"]))
                if secret is None and not ref.get("optional"):
                    raise ContainerConfigError(f'secret "{ref["name"]}" not found')
                for key, value in ((secret or {}).get("data") or {}).items():
                    env[source.get("prefix", "") + key] = base64.b64decode(value).decode()
        for item in container.get("env") or []:
            if "value" in item:
                env[item["name"]] = expand(str(item["value"]), env)
                continue
            source = item.get("valueFrom") or {}
            if "fieldRef" in source:
                path = source["fieldRef"]["fieldPath"]
                match = re.match(r"metadata\.(annotations|labels)\['(.+)'\]", path)
                if match:
                    env[item["name"]] = meta.get(match.group(1), {}).get(match.group(2), "")
                elif path in ("metadata.name", "metadata.namespace", "metadata.uid"):
                    env[item["name"]] = meta[path.split(".")[1]]
                elif path == "spec.serviceAccountName":
                    env[item["name"]] = pod["spec"].get("serviceAccountName", "default")
                elif path in ("status.podIP", "status.hostIP"):
                    env[item["name"]] = "127.0.0.1"
                elif path == "spec.nodeName":
                    env[item["name"]] = "wove-emulated-node"
            elif "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                secret = self.secrets.get((meta["namespace"], ref["name"]))
                data = (secret or {}).get("data") or {}
                if ref["key"] not in data:
                    if ref.get("optional"):
                        continue
                    raise ContainerConfigError(
                        f'secret "{ref["name"]}" not found'
                        if secret is None
                        else f"couldn't find key {ref['key']} in Secret "
                        f"{meta['namespace']}/{ref['name']}"
                    )
                env[item["name"]] = base64.b64decode(data[ref["key"]]).decode()
        return env

    async def _start(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        key = (meta["namespace"], meta["name"])
        container = pod["spec"]["containers"][0]
        cname = container["name"]
        image = container.get("image", "")
        host = image.split("/", 1)[0] if "/" in image else ""
        if host.split(":")[0].endswith(".invalid"):
            self._waiting(
                pod,
                cname,
                "ErrImagePull",
                f'failed to pull and unpack image "{image}": dial tcp: lookup {host}: no such host',
            )
            await asyncio.sleep(1.0)
            if key in self.pods:
                self._waiting(pod, cname, "ImagePullBackOff", f'Back-off pulling image "{image}"')
            return  # never starts, like a real kubelet that cannot pull
        try:
            env = self._container_env(pod, container)
        except ContainerConfigError as exc:
            self._waiting(pod, cname, "CreateContainerConfigError", str(exc))
            return
        argv = [
            expand(a, env)
            for a in [*(container.get("command") or []), *(container.get("args") or [])]
        ]
        workdir = self.state_dir / "pods" / meta["name"]
        workdir.mkdir(parents=True, exist_ok=True)
        log_path = self.state_dir / "logs" / f"{meta['namespace']}_{meta['name']}.log"
        if not argv:
            argv = ["/bin/true"]
        exe = argv[0] if "/" in argv[0] else shutil.which(argv[0], path=env["PATH"])
        log = open(log_path, "ab")  # noqa: ASYNC230 - tiny local file, handed to the child
        try:
            if exe is None:
                raise FileNotFoundError(argv[0])
            proc = await asyncio.create_subprocess_exec(
                exe,
                *argv[1:],
                env=env,
                cwd=container.get("workingDir") or str(workdir),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
            log.write(f"exec {argv[0]!r} failed: {exc}\n".encode())
            log.close()
            message = (
                f"failed to create containerd task: failed to create shim task: OCI runtime "
                f"create failed: runc create failed: unable to start container process: "
                f'exec: "{argv[0]}": executable file not found in $PATH: unknown'
            )
            self._terminated(pod, cname, 128, "StartError", message)
            return
        finally:
            if not log.closed:
                log.close()
        if key not in self.pods or meta.get("deletionTimestamp"):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        self.procs[key] = proc
        started = now_iso()
        pod["status"].update(
            phase="Running",
            containerStatuses=[
                {
                    "name": cname,
                    "image": image,
                    "imageID": f"{image}@sha256:{'0' * 64}",
                    "containerID": f"containerd://{uuid.uuid4().hex}",
                    "ready": True,
                    "started": True,
                    "restartCount": 0,
                    "state": {"running": {"startedAt": started}},
                }
            ],
        )
        pod["status"]["conditions"] = [
            {"type": t, "status": "True", "lastTransitionTime": started}
            for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
        ]
        self.bump(pod)
        code = await proc.wait()
        self.procs.pop(key, None)
        if code < 0:
            code = 128 - code
        reason = "Completed" if code == 0 else "Error"
        self._terminated(pod, cname, code, reason, None)
        if meta.get("deletionTimestamp") or key not in self.pods:
            self._remove_pod(pod)

    def _waiting(self, pod: dict[str, Any], cname: str, reason: str, message: str) -> None:
        pod["status"]["containerStatuses"] = [
            {
                "name": cname,
                "image": pod["spec"]["containers"][0]["image"],
                "imageID": "",
                "ready": False,
                "started": False,
                "restartCount": 0,
                "state": {"waiting": {"reason": reason, "message": message}},
            }
        ]
        self.bump(pod)

    def _terminated(
        self, pod: dict[str, Any], cname: str, code: int, reason: str, message: str | None
    ) -> None:
        state: dict[str, Any] = {"exitCode": code, "reason": reason, "finishedAt": now_iso()}
        if message:
            state["message"] = message
        statuses = pod["status"].get("containerStatuses") or [{"name": cname, "restartCount": 0}]
        statuses[0].update(ready=False, started=False, state={"terminated": state})
        pod["status"]["containerStatuses"] = statuses
        pod["status"]["phase"] = "Succeeded" if code == 0 else "Failed"
        pod["status"]["conditions"] = [
            c
            if c["type"] not in ("Ready", "ContainersReady")
            else {**c, "status": "False", "reason": "PodCompleted"}
            for c in pod["status"].get("conditions") or []
        ]
        self._account(pod)
        self.bump(pod)

    # ------------------------------------------------------------ the Job controller

    async def run_controller(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), 0.2)
            self.wake.clear()
            try:
                for job in list(self.jobs.values()):
                    self._sync_job(job)
                self._schedule()
            except Exception as exc:  # keep the controller alive; show what broke
                print(f"controller error: {exc!r}", flush=True)

    def _sync_job(self, job: dict[str, Any]) -> None:
        meta, spec, status = job["metadata"], job["spec"], job["status"]
        if meta.get("deletionTimestamp"):
            return
        state = self.job_state[meta["uid"]]
        if state.get("done_at") is not None:
            ttl = spec.get("ttlSecondsAfterFinished")
            if ttl is not None and time.time() >= state["done_at"] + ttl:
                self.delete_job(meta["namespace"], meta["name"], "Background", False)
            return
        pods = self.owned_pods(meta["uid"])
        active = [
            p
            for p in pods
            if p["status"]["phase"] in ("Pending", "Running")
            and not p["metadata"].get("deletionTimestamp")
        ]
        if spec.get("suspend"):
            for pod in active:
                self.delete_pod(pod, grace=None, by_controller=True)
            self._set_counts(job, pods, state)
            return
        if not status.get("startTime"):
            status["startTime"] = now_iso()
            state["started_at"] = time.time()
        completions = int(spec.get("completions") or 1)
        parallelism = int(spec.get("parallelism") if spec.get("parallelism") is not None else 1)
        backoff = int(spec.get("backoffLimit", 6))
        deadline = spec.get("activeDeadlineSeconds")
        failure: tuple[str, str] | None = None
        if deadline is not None and time.time() - state["started_at"] > deadline:
            failure = ("DeadlineExceeded", "Job was active longer than specified deadline")
        elif state["failed"] > backoff:
            failure = ("BackoffLimitExceeded", "Job has reached the specified backoff limit")
        if spec["completionMode"] == "Indexed":
            per_index = spec.get("backoffLimitPerIndex")
            if per_index is not None:
                for index, count in state["failures"].items():
                    if count > per_index and index not in state["done_indexes"]:
                        state["failed_indexes"].add(index)
            running = {int(p["metadata"]["annotations"][INDEX_KEY]) for p in active}
            settled = state["done_indexes"] | state["failed_indexes"]
            if failure is None and len(settled) >= completions:
                if state["failed_indexes"]:
                    failure = ("FailedIndexes", "Job has failed indexes")
                else:
                    self._finish(job, "Complete", None, None, pods, state)
                    return
            if failure is None:
                budget = parallelism - len(active)
                for index in range(completions):
                    if budget <= 0:
                        break
                    if index in settled or index in running:
                        continue
                    self.new_pod(job, index)
                    budget -= 1
        else:
            if failure is None and state["succeeded_count"] >= completions:
                self._finish(job, "Complete", None, None, pods, state)
                return
            if failure is None:
                want = min(parallelism, completions - state["succeeded_count"]) - len(active)
                for _ in range(max(want, 0)):
                    self.new_pod(job, None)
        if failure is not None:
            for pod in active:
                self.delete_pod(pod, grace=None, by_controller=True)
            self._finish(job, "Failed", failure[0], failure[1], pods, state)
            return
        self._set_counts(job, self.owned_pods(meta["uid"]), state)

    def _set_counts(
        self, job: dict[str, Any], pods: list[dict[str, Any]], state: dict[str, Any]
    ) -> None:
        status = job["status"]
        live = [p for p in pods if p["status"]["phase"] in ("Pending", "Running")]
        new = {
            "active": sum(1 for p in live if not p["metadata"].get("deletionTimestamp")),
            "ready": sum(
                1
                for p in live
                if p["status"]["phase"] == "Running" and not p["metadata"].get("deletionTimestamp")
            ),
            "terminating": sum(1 for p in live if p["metadata"].get("deletionTimestamp")),
            "succeeded": state["succeeded_count"],
            "failed": state["failed"],
        }
        if job["spec"]["completionMode"] == "Indexed":
            new["completedIndexes"] = compress(state["done_indexes"])
            if job["spec"].get("backoffLimitPerIndex") is not None:
                new["failedIndexes"] = compress(state["failed_indexes"])
        changed = False
        for key, value in new.items():
            if value in (0, "") and key not in status:
                continue
            if status.get(key) != value:
                status[key] = value
                changed = True
        if changed:
            self.bump(job)

    def _finish(
        self,
        job: dict[str, Any],
        kind: str,
        reason: str | None,
        message: str | None,
        pods: list[dict[str, Any]],
        state: dict[str, Any],
    ) -> None:
        stamp = now_iso()
        conditions = job["status"].setdefault("conditions", [])
        if kind == "Complete":
            conditions.append(
                {
                    "type": "SuccessCriteriaMet",
                    "status": "True",
                    "reason": "CompletionsReached",
                    "message": "Reached expected number of succeeded pods",
                    "lastProbeTime": stamp,
                    "lastTransitionTime": stamp,
                }
            )
            conditions.append(
                {
                    "type": "Complete",
                    "status": "True",
                    "reason": "CompletionsReached",
                    "message": "Reached expected number of succeeded pods",
                    "lastProbeTime": stamp,
                    "lastTransitionTime": stamp,
                }
            )
            job["status"]["completionTime"] = stamp
        else:
            conditions.append(
                {
                    "type": "FailureTarget",
                    "status": "True",
                    "reason": reason,
                    "message": message,
                    "lastProbeTime": stamp,
                    "lastTransitionTime": stamp,
                }
            )
            conditions.append(
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": reason,
                    "message": message,
                    "lastProbeTime": stamp,
                    "lastTransitionTime": stamp,
                }
            )
        state["done_at"] = time.time()
        self._set_counts(job, pods, state)
        self.bump(job)

    async def shutdown(self) -> None:
        for proc in list(self.procs.values()):
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)


class ContainerConfigError(Exception):
    pass


def expand(text: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion: known names are replaced, $$ escapes, others stay."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env[name] if name in env else match.group(0)

    return VAR_REF.sub(one, text)


def merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return patch
    if not isinstance(target, dict):
        target = {}
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        else:
            target[key] = merge_patch(target.get(key), value)
    return target


def json_patch(target: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
        parent: Any = target
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent.setdefault(part, {})
        last = parts[-1]
        if op["op"] in ("add", "replace"):
            if isinstance(parent, list):
                parent.insert(len(parent) if last == "-" else int(last), op["value"])
            else:
                parent[last] = op["value"]
        elif op["op"] == "remove":
            if isinstance(parent, list):
                parent.pop(int(last))
            else:
                parent.pop(last, None)
        else:
            raise ApiError(
                422, "Invalid", f"json patch op {op['op']!r} is not supported by this server"
            )
    return target


# ---------------------------------------------------------------- HTTP


def list_of(kind: str, items: list[dict[str, Any]], version: int) -> dict[str, Any]:
    api = "batch/v1" if kind == "JobList" else "v1"
    return {
        "kind": kind,
        "apiVersion": api,
        "metadata": {"resourceVersion": str(version)},
        "items": [
            {k: v for k, v in item.items() if k not in ("kind", "apiVersion")} for item in items
        ],
    }


def named(request: web.Request) -> tuple[str, str]:
    """(namespace, name) of the object a request's path names."""
    return request.match_info["ns"], request.match_info["name"]


def listed(request: web.Request, cluster: Cluster, kind: str, list_kind: str) -> web.Response:
    """A LIST of ``kind`` in the request's namespace, filtered by its label and field
    selectors, as the API server answers it."""
    ns = request.match_info["ns"]
    selector = request.query.get("labelSelector", "")
    fields = request.query.get("fieldSelector", "")
    items = [
        obj
        for (n, _), obj in sorted(getattr(cluster, kind).items())
        if n == ns
        and labels_match(obj["metadata"].get("labels") or {}, selector)
        and fields_match(kind, obj, fields)
    ]
    return web.json_response(list_of(list_kind, items, cluster.version))


def make_app(cluster: Cluster, token: str | None) -> web.Application:
    routes = web.RouteTableDef()

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        cluster.requests[request.method] = cluster.requests.get(request.method, 0) + 1
        if token is not None and request.headers.get("Authorization") != f"Bearer {token}":
            return ApiError(401, "Unauthorized", "Unauthorized").response()
        try:
            return await handler(request)
        except ApiError as exc:
            return exc.response()
        except (ValueError, KeyError, TypeError) as exc:
            return ApiError(
                400, "BadRequest", f"the server rejected our request: {exc!r}"
            ).response()

    async def body_of(request: web.Request) -> Any:
        raw = await request.read()  # a create POST from the client has no Content-Type
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ApiError(
                400, "BadRequest", f"the object provided is unrecognized: {exc}"
            ) from None

    @routes.get("/version")
    @routes.get("/version/")
    async def version(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "major": "1",
                "minor": "31",
                "gitVersion": "v1.31.0",
                "gitCommit": "0" * 40,
                "gitTreeState": "clean",
                "buildDate": "2024-08-13T07:28:49Z",
                "goVersion": "go1.22.5",
                "compiler": "gc",
                "platform": "linux/amd64",
            }
        )

    @routes.get("/healthz")
    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    @routes.get("/api/v1/namespaces")
    async def list_namespaces(request: web.Request) -> web.Response:
        items = [
            n
            for n in cluster.namespaces.values()
            if labels_match(
                n["metadata"].get("labels") or {}, request.query.get("labelSelector", "")
            )
        ]
        return web.json_response(list_of("NamespaceList", items, cluster.version))

    @routes.post("/api/v1/namespaces")
    async def create_namespace(request: web.Request) -> web.Response:
        body = await body_of(request)
        name = (body.get("metadata") or {}).get("name", "")
        check_name("Namespace", name)
        if name in cluster.namespaces:
            raise ApiError(409, "AlreadyExists", f'namespaces "{name}" already exists')
        cluster.namespaces[name] = cluster._namespace(name)
        return web.json_response(cluster.namespaces[name], status=201)

    @routes.get("/api/v1/namespaces/{ns}")
    async def read_namespace(request: web.Request) -> web.Response:
        ns = request.match_info["ns"]
        cluster.need_namespace(ns)
        return web.json_response(cluster.namespaces[ns])

    # ---- secrets
    @routes.post("/api/v1/namespaces/{ns}/secrets")
    async def create_secret(request: web.Request) -> web.Response:
        ns = request.match_info["ns"]
        cluster.need_namespace(ns)
        body = await body_of(request)
        name = (body.get("metadata") or {}).get("name", "")
        check_name("Secret", name)
        if (ns, name) in cluster.secrets:
            raise ApiError(409, "AlreadyExists", f'secrets "{name}" already exists')
        data = dict(body.get("data") or {})
        for key, value in (body.get("stringData") or {}).items():
            data[key] = base64.b64encode(str(value).encode()).decode()
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": body.get("type", "Opaque"),
            "metadata": {
                **body.get("metadata", {}),
                "namespace": ns,
                "uid": str(uuid.uuid4()),
                "creationTimestamp": now_iso(),
            },
            "data": data,
        }
        cluster.secrets[(ns, name)] = secret
        cluster.bump(secret)
        return web.json_response(secret, status=201)

    @routes.get("/api/v1/namespaces/{ns}/secrets/{name}")
    async def read_secret(request: web.Request) -> web.Response:
        key = named(request)
        if key not in cluster.secrets:
            raise ApiError(404, "NotFound", f'secrets "{key[1]}" not found')
        return web.json_response(cluster.secrets[key])

    @routes.delete("/api/v1/namespaces/{ns}/secrets/{name}")
    async def delete_secret(request: web.Request) -> web.Response:
        key = named(request)
        if cluster.secrets.pop(key, None) is None:
            raise ApiError(404, "NotFound", f'secrets "{key[1]}" not found')
        return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Success"})

    # ---- jobs
    @routes.post("/apis/batch/v1/namespaces/{ns}/jobs")
    async def create_job(request: web.Request) -> web.Response:
        body = await body_of(request)
        dry_run = request.query.get("dryRun") == "All"
        if "dryRun" in request.query and not dry_run:
            raise ApiError(
                400, "BadRequest", f'unsupported dry run option "{request.query["dryRun"]}"'
            )
        job = cluster.create_job(request.match_info["ns"], body, dry_run)
        return web.json_response(job, status=201)

    @routes.get("/apis/batch/v1/namespaces/{ns}/jobs")
    async def list_jobs(request: web.Request) -> web.StreamResponse:
        if request.query.get("watch") in ("true", "1"):
            raise ApiError(400, "BadRequest", "watch is not served by this test cluster")
        return listed(request, cluster, "jobs", "JobList")

    @routes.get("/apis/batch/v1/namespaces/{ns}/jobs/{name}")
    @routes.get("/apis/batch/v1/namespaces/{ns}/jobs/{name}/status")
    async def read_job(request: web.Request) -> web.Response:
        return web.json_response(cluster.get_job(*named(request)))

    @routes.patch("/apis/batch/v1/namespaces/{ns}/jobs/{name}")
    async def patch_job(request: web.Request) -> web.Response:
        patch = await body_of(request)
        job = cluster.patch_job(
            *named(request),
            request.headers.get("Content-Type", "application/merge-patch+json"),
            patch,
        )
        return web.json_response(job)

    @routes.delete("/apis/batch/v1/namespaces/{ns}/jobs/{name}")
    async def delete_job(request: web.Request) -> web.Response:
        options = await body_of(request)
        policy = request.query.get("propagationPolicy") or options.get("propagationPolicy")
        if policy is None and options.get("orphanDependents") is False:
            policy = "Background"
        code, body = cluster.delete_job(
            *named(request),
            policy,
            request.query.get("dryRun") == "All",
        )
        return web.json_response(body, status=code)

    # ---- pods
    @routes.get("/api/v1/namespaces/{ns}/pods")
    async def list_pods(request: web.Request) -> web.Response:
        return listed(request, cluster, "pods", "PodList")

    @routes.get("/api/v1/namespaces/{ns}/pods/{name}")
    async def read_pod(request: web.Request) -> web.Response:
        return web.json_response(cluster.get_pod(*named(request)))

    @routes.delete("/api/v1/namespaces/{ns}/pods/{name}")
    async def delete_pod(request: web.Request) -> web.Response:
        options = await body_of(request)
        pod = cluster.get_pod(*named(request))
        grace = request.query.get("gracePeriodSeconds", options.get("gracePeriodSeconds"))
        cluster.delete_pod(pod, grace=None if grace is None else int(grace))
        return web.json_response(pod)

    @routes.get("/api/v1/namespaces/{ns}/pods/{name}/log")
    async def pod_log(request: web.Request) -> web.Response:
        ns, name = named(request)
        cluster.get_pod(ns, name)
        path = cluster.state_dir / "logs" / f"{ns}_{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        tail = request.query.get("tailLines")
        if tail:
            text = "\n".join(text.splitlines()[-int(tail) :]) + "\n"
        return web.Response(text=text, content_type="text/plain")

    app = web.Application(middlewares=[middleware], client_max_size=64 * 1024 * 1024)
    app.add_routes(routes)
    return app


async def serve(args: argparse.Namespace) -> None:
    state_dir = Path(args.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - before serving
    cluster = Cluster(
        state_dir, args.capacity, set(args.readonly_namespace or []), set(args.namespace or [])
    )
    runner = web.AppRunner(make_app(cluster, args.token), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    controller = asyncio.get_running_loop().create_task(cluster.run_controller())
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    tmp = state_dir / "port.tmp"
    tmp.write_text(str(port))
    tmp.replace(state_dir / "port")
    print(f"kube emulator listening on http://127.0.0.1:{port}", flush=True)
    await stop.wait()
    controller.cancel()
    await cluster.shutdown()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--capacity", type=int, default=4, help="pods the one node runs at once")
    parser.add_argument("--token", default=None, help="require this bearer token")
    parser.add_argument("--namespace", action="append", help="namespaces that exist (plus default)")
    parser.add_argument(
        "--readonly-namespace",
        action="append",
        help="namespaces where creating Jobs is forbidden (RBAC)",
    )
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
