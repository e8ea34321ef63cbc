"""The Kubernetes objects of ``kubernetes_jobs`` as plain data: the Job we create, and what
a Job or Pod we read says about its runs.

Everything here is a pure function of dicts in the API's JSON shape: building the Job
manifest (names, labels, the worker container, Indexed Jobs), and reading Job conditions,
completed/failed indexes, a Pod that can never start, a Pod whose worker refused its
payload. No client, no I/O, no ``kubernetes`` import: the adapter
(``adapters/kubernetes_jobs.py``) sends and fetches these objects, and a deployment can
print a manifest without a cluster.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from wove_adapters.adapters.base import digested
from wove_adapters.worker.runner import EXIT_PAYLOAD_REFUSED, worker_command

MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "wove-adapters"
ENV_LABEL = "wove-adapters/environment"
TASK_LABEL = "wove-adapters/task"
INDEX_KEY = "batch.kubernetes.io/job-completion-index"
CONTAINER = "wove-worker"
# executor_config keys copied, when set, into the container and the Pod spec.
CONTAINER_FIELDS = {"image_pull_policy": "imagePullPolicy", "env_from": "envFrom",
                    "volume_mounts": "volumeMounts"}
POD_FIELDS = {
    "service_account": "serviceAccountName", "node_selector": "nodeSelector",
    "tolerations": "tolerations", "affinity": "affinity", "volumes": "volumes",
    "priority_class_name": "priorityClassName",
    "termination_grace_period_seconds": "terminationGracePeriodSeconds",
}

# Container waiting reasons that do not fix themselves: a Pod in one of these never starts.
START_FAILURES = frozenset({
    "ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
    "CreateContainerConfigError", "CreateContainerError", "RunContainerError",
})


# ---------------------------------------------------------------- names


def dns_label(text: str, *, max_len: int = 63) -> str:
    """An RFC 1123 label (lowercase alphanumerics and ``-``, alphanumeric at both ends, at
    most ``max_len``) from any text. A text that had to change keeps a digest of the
    original, so distinct keys give distinct names (``A`` and ``a`` included)."""
    cleaned = re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-")
    # "-" for nothing left: an empty text is no label either, it gets the digest alone.
    return digested(text, cleaned or "-", max_len=max_len, trim="-")


def label_value(text: str) -> str:
    """A valid label value (``[A-Za-z0-9._-]``, alphanumeric at both ends, at most 63)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "-", text).strip("-_.")
    return digested(text, cleaned, max_len=63, trim="-_.")


# ---------------------------------------------------------------- the Job we send


def job_manifest(
    name: str,
    payload_ref: str,
    options: dict[str, Any],
    *,
    environment: str,
    task_id: str,
    completions: int | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The Job object for one run (``completions=None``) or one Indexed Job, for the
    environment ``environment`` (its label selects the Jobs the adapter lists)."""
    python = str(options.get("python") or "python")
    ref_arg = "$(WOVE_PAYLOAD_REF)"
    if completions is not None:
        ref_arg += "-$(JOB_COMPLETION_INDEX)"
    env: list[dict[str, Any]] = [{"name": "WOVE_PAYLOAD_REF", "value": payload_ref}]
    env += [{"name": str(k), "value": str(v)} for k, v in (options.get("env") or {}).items()]
    secret_ref = options.get("secret_ref")
    if secret_ref:
        env.append({
            "name": "WOVE_ADAPTERS_SECRET",
            "valueFrom": {"secretKeyRef": {
                "name": secret_ref["name"], "key": secret_ref.get("key", "secret")}},
        })
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": options.get("image"),
        "command": worker_command(python),
        "args": ["--payload-ref", ref_arg],
        "env": env,
    }
    _put(container, "resources", _resources(options))
    _copy(container, options, CONTAINER_FIELDS)
    container.update(options.get("container") or {})
    labels = {
        MANAGED_BY: MANAGER,
        ENV_LABEL: label_value(environment),
        TASK_LABEL: label_value(task_id),
        **_strings(options.get("labels")),
    }
    user_annotations = _strings(options.get("annotations"))
    pod_spec: dict[str, Any] = {"restartPolicy": "Never", "containers": [container]}
    _copy(pod_spec, options, POD_FIELDS)
    pull_secrets = options.get("image_pull_secrets") or []
    _put(pod_spec, "imagePullSecrets",
         [s if isinstance(s, dict) else {"name": str(s)} for s in pull_secrets])
    pod_spec.update(options.get("pod_spec") or {})
    spec: dict[str, Any] = {
        "backoffLimit": int(options.get("backoff_limit", 0)),
        "template": {
            "metadata": {"labels": labels, "annotations": user_annotations},
            "spec": pod_spec,
        },
    }
    ttl = options.get("ttl_seconds_after_finished", 3600)
    _put(spec, "ttlSecondsAfterFinished", None if ttl is None else int(ttl))
    _put(spec, "activeDeadlineSeconds", options.get("active_deadline_seconds"))
    if completions is not None:
        # Each index fails on its own (one raising task must not stop the others);
        # backoffLimit then defaults to "unlimited" and must not be set to 0.
        spec.pop("backoffLimit")
        parallelism = int(options.get("parallelism") or completions)
        spec.update(completionMode="Indexed", completions=completions,
                    parallelism=min(parallelism, completions),
                    backoffLimitPerIndex=int(options.get("backoff_limit", 0)))
    spec.update(options.get("job_spec") or {})
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": {**user_annotations, **(annotations or {})},
        },
        "spec": spec,
    }


def _copy(target: dict[str, Any], options: dict[str, Any], fields: dict[str, str]) -> None:
    for option, key in fields.items():
        _put(target, key, options.get(option))


def _strings(mapping: dict[str, Any] | None) -> dict[str, str]:
    return {str(k): str(v) for k, v in (mapping or {}).items()}


def _put(target: dict[str, Any], key: str, value: Any) -> None:
    if value not in (None, "", [], {}):
        target[key] = value


def _resources(options: dict[str, Any]) -> dict[str, Any] | None:
    """``resources`` as Kubernetes writes it, or the ``cpu``/``memory``/``gpu`` shortcuts
    (requests = limits for memory, so an OOM kill happens at the number you chose)."""
    if options.get("resources"):
        return dict(options["resources"])
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if options.get("cpu"):
        requests["cpu"] = str(options["cpu"])
    if options.get("memory"):
        requests["memory"] = limits["memory"] = str(options["memory"])
    if options.get("gpu"):
        limits["nvidia.com/gpu"] = str(options["gpu"])
    out = {k: v for k, v in (("requests", requests), ("limits", limits)) if v}
    return out or None


# ---------------------------------------------------------------- what a Job says


@functools.lru_cache(maxsize=512)
def parse_indexes(text: str | None) -> frozenset[int]:
    """``"0-2,5"`` (the Job status format) -> ``{0, 1, 2, 5}`` (cached: every run of an
    Indexed Job asks about the same string)."""
    found: set[int] = set()
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        low, _, high = part.partition("-")
        found.update(range(int(low), int(high or low) + 1))
    return frozenset(found)


def native_state(job: dict[str, Any] | None, index: int | None = None) -> str:
    """What the Job says about one run (the whole Job, or one completion index)."""
    if job is None:
        return "GONE"
    if job.get("metadata", {}).get("deletionTimestamp"):
        return "TERMINATING"
    status = job.get("status") or {}
    if index is not None:
        if index in parse_indexes(status.get("completedIndexes")):
            return "COMPLETE"
        if index in parse_indexes(status.get("failedIndexes")):
            return "FAILED"
    true = [c.get("type", "") for c in status.get("conditions") or [] if c.get("status") == "True"]
    for kind in ("Complete", "SuccessCriteriaMet", "Failed", "FailureTarget", "Suspended"):
        if kind in true:
            # An index neither completed nor failed in a finished Job did not succeed.
            if index is not None and kind in ("Complete", "SuccessCriteriaMet"):
                return "FAILED"
            return kind.upper()
    if index is not None:
        return "ACTIVE"
    return "RUNNING" if status.get("ready") or status.get("succeeded") else "PENDING"


def has_unready_pods(job: dict[str, Any]) -> bool:
    status = job.get("status") or {}
    return int(status.get("active") or 0) > int(status.get("ready") or 0) and native_state(
        job
    ) in ("PENDING", "RUNNING")


# ---------------------------------------------------------------- what a Pod says


def index_of(pod: dict[str, Any]) -> int | None:
    raw = ((pod.get("metadata") or {}).get("annotations") or {}).get(INDEX_KEY)
    return int(raw) if raw is not None else None


def job_of(pod: dict[str, Any]) -> str:
    """The name of the Job that owns ``pod`` (from the labels the Job controller sets)."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return str(labels.get("batch.kubernetes.io/job-name") or labels.get("job-name", ""))


def start_failure(pod: dict[str, Any]) -> str | None:
    """The waiting reason of a Pod that cannot start, else None."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        waiting = (status.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in START_FAILURES:
            return f"{waiting['reason']}: {waiting.get('message', '')}".strip()
    return None


def waiting_reason(pod: dict[str, Any]) -> str | None:
    """Why a Pending Pod has not started: the scheduler's verdict (Unschedulable, with
    its "0/3 nodes are available: ..." message) or a container's waiting reason."""
    status = pod.get("status") or {}
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return ": ".join(filter(None, (condition.get("reason") or "Unscheduled",
                                           condition.get("message"))))
    for container in status.get("containerStatuses") or []:
        if waiting := (container.get("state") or {}).get("waiting"):
            return ": ".join(filter(None, (waiting.get("reason") or "Waiting",
                                           waiting.get("message"))))
    return None


def refused(pod: dict[str, Any]) -> bool:
    """Whether the Pod's worker refused its payload: our container ended with the
    worker's refusal exit code (the only report a refusal gets)."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        terminated = (status.get("state") or {}).get("terminated") or {}
        if status.get("name") == CONTAINER and terminated.get("exitCode") == EXIT_PAYLOAD_REFUSED:
            return True
    return False
