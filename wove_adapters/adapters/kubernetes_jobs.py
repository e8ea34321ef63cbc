"""``kubernetes_jobs``: each task is a Kubernetes Job; a mapped task is one Indexed Job.

The adapter talks to the API server with the official ``kubernetes`` client: the sync
client, created once per adapter, every call in the adapter's own small thread pool, so
the event loop never blocks. The signed payload goes to the payload store (a directory
the Pods mount, Redis, ...); the Pod spec carries only its reference, in the env var
``WOVE_PAYLOAD_REF``, and runs ``python -m wove_adapters.worker --payload-ref
$(WOVE_PAYLOAD_REF)`` (the kubelet expands ``$(VAR)``; an Indexed Job's Pods add
``-$(JOB_COMPLETION_INDEX)``).

Job names are RFC 1123 labels (63 characters, lowercase alphanumerics and ``-``) derived
from the idempotency key, so one key is one Job: ``409 AlreadyExists`` on create means the
Job exists and the run attaches to it. Without a key the name comes from the run id.
Status comes from the Job's conditions, counts and completed/failed indexes (and, while a
Pod waits, from its container state, so a Pod that can never start is a lost run); one
LIST per namespace answers every run's status for a second. A failed Job whose Pod's
worker exited 2 refused its payload (it reports that no other way): the run fails with a
PayloadError naming the key, never requeued. The manifest and the reading of Job and Pod
objects are pure functions in ``kubernetes_manifest``. Cancel deletes the Job with
``propagationPolicy=Background`` (its Pods go too; the worker gets SIGTERM and reports
``task_cancelled``); one index of an Indexed Job is cancelled by deleting its Pod and
its payload. This module imports ``kubernetes`` only inside methods.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import os
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from wove_adapters.adapters.base import BackendAdapter, JobSpec
from wove_adapters.adapters.kubernetes_manifest import (
    ENV_LABEL,
    MANAGED_BY,
    MANAGER,
    dns_label,
    has_unready_pods,
    index_of,
    job_manifest,
    job_of,
    label_value,
    native_state,
    refused,
    start_failure,
    waiting_reason,
)
from wove_adapters.core import stores as payload_mod
from wove_adapters.core.aio import submit_grouped
from wove_adapters.core.doctor import Row, checked_row, store_row
from wove_adapters.core.options import AdapterOptions
from wove_adapters.core.policies import Capabilities, JobState
from wove_adapters.core.signing import secret_text

# Native states (derived from a Job and its waiting Pods) in the shared vocabulary.
_STATES: dict[str, JobState] = {
    "PENDING": JobState.PENDING,  # created, no Pod ready yet (unscheduled, pulling, ...)
    "SUSPENDED": JobState.PENDING,
    "RUNNING": JobState.RUNNING,  # a Pod is ready
    "ACTIVE": JobState.RUNNING,  # an Indexed Job is running (this index not settled yet)
    "TERMINATING": JobState.RUNNING,  # deletion in progress (foreground finalizer)
    "COMPLETE": JobState.SUCCEEDED,
    "SUCCESSCRITERIAMET": JobState.SUCCEEDED,
    "FAILED": JobState.FAILED,  # BackoffLimitExceeded, DeadlineExceeded, FailedIndexes, ...
    "FAILURETARGET": JobState.FAILED,  # Pods still terminating, the Job will fail
    "START_FAILED": JobState.FAILED,  # a Pod stuck in ImagePullBackOff & co past pending_timeout
    "CANCELLED": JobState.CANCELLED,  # an index we cancelled has settled
    "REFUSED": JobState.REFUSED,  # failed, and its worker refused the payload (exit 2)
    "GONE": JobState.GONE,  # 404: deleted (by us, TTL, or someone else)
}


class KubernetesApiError(RuntimeError):
    """The API server refused a request; the message carries its Status message."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------- bookkeeping


@dataclass
class _Job:
    """One Job we submitted or attached to."""

    namespace: str
    name: str
    created: bool  # we created it (an attached Job belongs to someone else)
    payload_keys: dict[int | None, str]  # index (None: a plain Job) -> payload key
    open_runs: set[int | None] = field(default_factory=set)
    cancelled: set[int | None] = field(default_factory=set)


class KubernetesJobsOptions(AdapterOptions, kw_only=True):
    """``executor_config`` of ``kubernetes_jobs`` (docs/adapters/kubernetes_jobs.md)."""

    image: str | None = None  # required (here or in task_options)
    namespace: str | None = None
    kubeconfig: str | None = None
    context: str | None = None
    host: str | None = None
    token: str | None = None
    ca_cert: str | None = None
    verify_ssl: bool | None = None
    in_cluster: bool | None = None
    python: str = "python"
    service_account: str | None = None
    image_pull_secrets: list[Any] = []
    image_pull_policy: str | None = None
    resources: dict[str, Any] | None = None
    cpu: str | None = None
    memory: str | None = None
    gpu: str | None = None
    env: dict[str, Any] = {}
    env_from: list[Any] | None = None
    volumes: list[Any] | None = None
    volume_mounts: list[Any] | None = None
    node_selector: dict[str, Any] | None = None
    tolerations: list[Any] | None = None
    affinity: dict[str, Any] | None = None
    priority_class_name: str | None = None
    termination_grace_period_seconds: int | None = None
    labels: dict[str, Any] = {}
    annotations: dict[str, Any] = {}
    secret_ref: dict[str, Any] | None = None
    backoff_limit: int = 0
    ttl_seconds_after_finished: int | None = 3600
    active_deadline_seconds: int | None = None
    parallelism: int | None = None
    pod_spec: dict[str, Any] = {}
    container: dict[str, Any] = {}
    job_spec: dict[str, Any] = {}
    cleanup: bool = True
    array_jobs: bool = True
    pending_timeout: float = 120.0
    api_threads: int = 8
    request_timeout: float = 30.0


class KubernetesJobsAdapter(BackendAdapter):
    name = "kubernetes_jobs"
    config_struct = KubernetesJobsOptions
    required_modules = ("kubernetes",)
    capabilities = Capabilities.backend(
        cancel_running=True,
        confirm_cancel=True,
        native_idempotency=True,
        inline_payload_limit=1024 * 1024,
        array_jobs=True,
    )
    STATE_MAP: ClassVar[dict[str, JobState]] = _STATES
    confirm_poll_seconds: ClassVar[float] = 1.0  # one round is a LIST per namespace
    # The job's pod ends with its task, having delivered or recorded
    # its outcome first.
    after_job: ClassVar[str] = "flushed"

    options: KubernetesJobsOptions

    def __init__(self, config: dict[str, Any], *, environment: str) -> None:
        super().__init__(config, environment=environment)
        if not self.options.array_jobs:  # clusters older than 1.29 (backoffLimitPerIndex)
            self.capabilities = dataclasses.replace(  # type: ignore[misc]
                self.capabilities, array_jobs=False
            )
        self.namespace = self.options.namespace or ""
        self.submissions = 0  # Jobs created (an Indexed Job counts once)
        self._api: Any = None
        self._batch: Any = None
        self._core: Any = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._jobs: dict[tuple[str, str], _Job] = {}
        # namespace -> (job, index) -> why its Pod cannot start (past pending_timeout)
        self._stuck: dict[str, dict[tuple[str, int | None], str]] = {}
        self._stuck_since: dict[str, float] = {}
        self._pods_every = max(1.0, min(self.options.pending_timeout / 4, 15.0))
        self._pods_listed_at: dict[str, float] = {}
        # The label selector of this environment's Jobs and Pods.
        self._ours = f"{MANAGED_BY}={MANAGER},{ENV_LABEL}={label_value(self.environment)}"

    # ------------------------------------------------------------ client

    async def start(self) -> None:
        from kubernetes import client

        if not (self.options.image or self.options.task_options.get("image")):
            raise ValueError(
                "kubernetes_jobs needs executor_config 'image': an image with wove-adapters "
                "installed (e.g. FROM python:3.11-slim + RUN pip install wove-adapters)"
            )
        threads = self.options.api_threads
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="wove-k8s")
        try:
            configuration, context_namespace = await self._in_pool(self._client_configuration)
        except Exception:
            await self.aclose()
            raise
        configuration.connection_pool_maxsize = threads
        self.namespace = self.namespace or context_namespace or "default"
        self._api = client.ApiClient(configuration)
        self._batch = client.BatchV1Api(self._api)
        self._core = client.CoreV1Api(self._api)
        try:
            await self._call(client.VersionApi(self._api).get_code)
        except KubernetesApiError as exc:
            raise KubernetesApiError(
                f"the Kubernetes API at {configuration.host} is not usable: {exc} "
                "(check executor_config kubeconfig/context/host/token)", exc.status
            ) from None

    def _client_configuration(self) -> tuple[Any, str | None]:
        """Blocking (reads files): runs in the pool. Explicit ``host`` > in-cluster >
        kubeconfig (``kubeconfig``/``context``, else $KUBECONFIG or ~/.kube/config)."""
        from kubernetes import client
        from kubernetes import config as kube_config

        cfg = client.Configuration()
        namespace: str | None = None
        options = self.options
        if options.host:
            cfg.host = options.host.rstrip("/")
            if options.token:
                token = secret_text(options.token, option="token")
                cfg.api_key["BearerToken"] = f"Bearer {token}"
            if options.ca_cert:
                cfg.ssl_ca_cert = options.ca_cert
        elif options.in_cluster or (
            options.in_cluster is None and not options.kubeconfig
            and os.environ.get("KUBERNETES_SERVICE_HOST")
        ):
            kube_config.load_incluster_config(client_configuration=cfg)
            with contextlib.suppress(OSError):
                with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as handle:
                    namespace = handle.read().strip() or None
        else:
            path, context = options.kubeconfig, options.context
            kube_config.load_kube_config(
                config_file=path, context=context, client_configuration=cfg
            )
            with contextlib.suppress(Exception):  # the context's namespace is a default only
                contexts, active = kube_config.list_kube_config_contexts(config_file=path)
                if context:
                    active = next(c for c in contexts if c["name"] == context)
                namespace = (active.get("context") or {}).get("namespace")
        if options.verify_ssl is not None:
            cfg.verify_ssl = options.verify_ssl
        return cfg, namespace

    async def _in_pool(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    async def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One API call off the loop; the JSON body as plain data (no model objects)."""
        from kubernetes.client.exceptions import ApiException

        def call() -> Any:
            try:
                response = method(
                    *args, _preload_content=False,
                    _request_timeout=self.options.request_timeout, **kwargs,
                )
            except ApiException as exc:
                raise _api_error(exc) from None
            except Exception as exc:  # connection refused, DNS, TLS: say where
                raise KubernetesApiError(f"{type(exc).__name__}: {exc}") from exc
            try:
                data = response.data
            finally:
                with contextlib.suppress(Exception):
                    response.release_conn()
            if not data:
                return {}
            try:
                return json.loads(data)
            except ValueError:
                return data.decode(errors="replace")

        return await self._in_pool(call)

    # ------------------------------------------------------------ the Job we send

    def manifest(
        self,
        name: str,
        payload_ref: str,
        options: dict[str, Any],
        *,
        task_id: str,
        completions: int | None = None,
        annotations: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """The Job object for one run (``completions=None``) or one Indexed Job. Public, so
        a deployment can print it and ``kubectl create -f`` it (see the docs)."""
        return job_manifest(name, payload_ref, options, environment=self.environment,
                            task_id=task_id, completions=completions, annotations=annotations)

    def job_name(self, job: JobSpec) -> str:
        """One key, one Job: the name is the key's RFC 1123 form. A requeued attempt (the
        first one's Job was lost) gets a distinct name; without a key, the run's name."""
        if job.idempotency_key is not None:
            key = f"wove-{job.idempotency_key}"
            return dns_label(key if job.attempt <= 1 else f"{key}#attempt-{job.attempt}")
        return dns_label(job.job_name)

    def _store(self) -> payload_mod.PayloadStore:
        return payload_mod.open_store(self.options.payload_store)

    # ------------------------------------------------------------ submit

    async def submit(self, job: JobSpec) -> str:
        options = self.options_for(job)
        namespace = str(options.get("namespace") or self.namespace)
        name = self.job_name(job)
        store = self._store()
        key = f"k8s-{name}-{secrets.token_hex(4)}"
        await self._in_pool(store.put, key, job.payload.encode())
        annotations = {
            "wove-adapters/run-id": job.run_id, "wove-adapters/attempt": str(job.attempt)
        }
        if job.idempotency_key is not None:
            annotations["wove-adapters/idempotency-key"] = job.idempotency_key
        body = self.manifest(name, f"{store.url}#{key}", options, task_id=job.task_id,
                             annotations=annotations)
        created = await self._create(namespace, body, store, [key])
        tracked = _Job(namespace, name, created, {None: key} if created else {})
        tracked.open_runs.add(None)
        self._jobs.setdefault((namespace, name), tracked).open_runs.add(None)
        return f"{namespace}/{name}"

    async def submit_many(self, jobs: list[JobSpec]) -> list[str]:
        """N runs -> one Indexed Job per group of runs with the same options; handles are
        ``namespace/name#index``."""
        return await submit_grouped(
            jobs, lambda job: json.dumps([job.task_id, job.options], sort_keys=True, default=str),
            self._submit_indexed)

    async def _submit_indexed(self, jobs: list[JobSpec]) -> list[str]:
        first = jobs[0]
        options = self.options_for(first)
        namespace = str(options.get("namespace") or self.namespace)
        name = f"{dns_label('wove-' + first.task_id, max_len=40)}-{secrets.token_hex(4)}"
        store = self._store()
        keys = [f"k8s-{name}-{index}" for index in range(len(jobs))]

        def put_all() -> None:
            for key, job in zip(keys, jobs, strict=True):
                store.put(key, job.payload.encode())

        await self._in_pool(put_all)
        annotations = {"wove-adapters/run-ids": json.dumps([j.run_id for j in jobs])}
        body = self.manifest(name, f"{store.url}#k8s-{name}", options, task_id=first.task_id,
                             completions=len(jobs), annotations=annotations)
        await self._create(namespace, body, store, keys)
        tracked = _Job(namespace, name, True, dict(enumerate(keys)))
        tracked.open_runs.update(range(len(jobs)))
        self._jobs[(namespace, name)] = tracked
        return [f"{namespace}/{name}#{index}" for index in range(len(jobs))]

    async def _create(
        self, namespace: str, body: dict[str, Any], store: payload_mod.PayloadStore,
        keys: list[str],
    ) -> bool:
        """Create the Job; True if we created it, False if it already existed (attach)."""
        try:
            await self._call(self._batch.create_namespaced_job, namespace, body)
        except KubernetesApiError as exc:
            await self._in_pool(store.discard, keys)
            if exc.status == 409:
                return False
            raise KubernetesApiError(
                f"creating Job {namespace}/{body['metadata']['name']} failed: {exc}", exc.status
            ) from None
        self.submissions += 1
        return True

    # ------------------------------------------------------------ status

    async def status_many(self, handles: Sequence[str]) -> dict[str, JobState]:
        """One LIST of our Jobs per namespace (by label selector) for every handle asked
        about, plus a GET for a Job that is not ours to list (attached to another
        environment's Job)."""
        parsed = {handle: _parse(handle) for handle in handles}
        namespaces = sorted({namespace for namespace, _, _ in parsed.values()})
        snapshots = dict(zip(
            namespaces, await asyncio.gather(*(self._snapshot(n) for n in namespaces)),
            strict=True,
        ))
        states: dict[str, JobState] = {}
        for handle, (namespace, name, index) in parsed.items():
            jobs, stuck = snapshots[namespace]
            job = jobs.get(name)
            if job is None:
                job = jobs[name] = await self._read_job(namespace, name)
            state = self.map_state(native_state(job, index))
            if state in (JobState.PENDING, JobState.RUNNING) and (
                (name, index) in stuck or (name, None) in stuck
            ):
                state = self.map_state("START_FAILED")
            tracked = self._jobs.get((namespace, name))
            if tracked is not None and index in tracked.cancelled and (
                job is None or state.finished
            ):
                # Confirmed only once no Pod of it is left: a terminating worker still runs.
                if await self._pods_left(namespace, name, index):
                    state = self.map_state("TERMINATING")
                else:
                    state = self.map_state("GONE" if job is None else "CANCELLED")
            states[handle] = state
        failed = {h: parsed[h] for h, state in states.items() if state is JobState.FAILED}
        if failed:
            refusals = await self._refused_pods(sorted({n for n, _, _ in failed.values()}))
            for handle, (namespace, name, index) in failed.items():
                if (namespace, name, index) in refusals:
                    states[handle] = self.map_state("REFUSED")
        return states

    async def _refused_pods(self, namespaces: list[str]) -> set[tuple[str, str, int | None]]:
        """``(namespace, job, index)`` of the failed Pods whose worker refused its payload
        (exit code 2: it reports a refusal no other way). Asked only when a Job failed:
        one LIST of failed Pods of ours per namespace (any environment's: a Job we
        attached to carries its creator's environment label)."""
        listed = await asyncio.gather(*(
            self._call(self._core.list_namespaced_pod, namespace,
                       label_selector=f"{MANAGED_BY}={MANAGER}",
                       field_selector="status.phase=Failed")
            for namespace in namespaces
        ))
        return {
            (namespace, job_of(pod), index_of(pod))
            for namespace, pods in zip(namespaces, listed, strict=True)
            for pod in pods.get("items") or []
            if refused(pod)
        }

    async def _read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = await self._call(
                self._batch.read_namespaced_job, name, namespace
            )
        except KubernetesApiError as exc:
            if exc.status == 404:
                return None
            raise
        return found

    async def _pods_left(self, namespace: str, name: str, index: int | None) -> bool:
        listed = await self._call(
            self._core.list_namespaced_pod, namespace, label_selector=f"job-name={name}"
        )
        return any(
            (pod.get("status") or {}).get("phase") in ("Pending", "Running", None)
            and (index is None or index_of(pod) == index)
            for pod in listed.get("items") or []
        )

    async def _snapshot(
        self, namespace: str
    ) -> tuple[dict[str, dict[str, Any] | None], dict[tuple[str, int | None], str]]:
        """Our Jobs in a namespace (one LIST), and the Pods that cannot start: Pending
        Pods are listed when a Job has Pods that are not ready, at most every
        ``_pods_every`` seconds (the verdict is kept in between)."""
        started = time.monotonic()
        listed = await self._call(
            self._batch.list_namespaced_job, namespace, label_selector=self._ours
        )
        jobs: dict[str, dict[str, Any] | None] = {
            j["metadata"]["name"]: j for j in listed.get("items") or []
        }
        pods_due = started - self._pods_listed_at.get(namespace, -1e9) >= self._pods_every
        if pods_due and any(j is not None and has_unready_pods(j) for j in jobs.values()):
            # Scheduled yet not running: pulling, or stuck (unscheduled Pods only wait).
            self._pods_listed_at[namespace] = started
            pods = await self._call(
                self._core.list_namespaced_pod, namespace, label_selector=self._ours,
                field_selector="status.phase=Pending,spec.nodeName!=",
            )
            self._stuck[namespace] = self._stuck_pods(pods.get("items") or [], started)
        return jobs, self._stuck.get(namespace, {})

    def _stuck_pods(
        self, pods: list[dict[str, Any]], now: float
    ) -> dict[tuple[str, int | None], str]:
        """Pods that cannot start (image pull, config errors) for ``pending_timeout``."""
        stuck: dict[tuple[str, int | None], str] = {}
        seen: set[str] = set()
        for pod in pods:
            reason = start_failure(pod)
            if reason is None:
                continue
            meta = pod.get("metadata") or {}
            uid = str(meta.get("uid", ""))
            seen.add(uid)
            if now - self._stuck_since.setdefault(uid, now) < self.options.pending_timeout:
                continue
            stuck[(job_of(pod), index_of(pod))] = reason
        for uid in set(self._stuck_since) - seen:
            del self._stuck_since[uid]
        return stuck

    async def waiting_reasons(self, handles: Sequence[str]) -> dict[str, str]:
        """Each pending run's Pod in the scheduler's or the kubelet's words (one LIST of
        Pending Pods per namespace): capacity that never comes shows up here."""
        wanted = {_parse(handle): handle for handle in handles}
        reasons: dict[str, str] = {}
        for namespace in sorted({namespace for namespace, _, _ in wanted}):
            pods = await self._call(self._core.list_namespaced_pod, namespace, label_selector=
                                    self._ours, field_selector="status.phase=Pending")
            for pod in pods.get("items") or []:
                handle = wanted.get((namespace, job_of(pod), index_of(pod)))
                if handle is not None and (why := waiting_reason(pod)) is not None:
                    reasons[handle] = f"pod {pod['metadata']['name']}: {why}"
        return reasons

    # ------------------------------------------------------------ cancel, release

    async def cancel(self, handle: str, *, running: bool = True) -> None:
        namespace, name, index = _parse(handle)
        tracked = self._jobs.get((namespace, name))
        if tracked is not None:
            tracked.cancelled.add(index)
        if index is None:
            await self._delete_job(namespace, name)
            return
        # One index of an Indexed Job: its payload goes first (a Pod that has not started
        # yet then finds nothing to run), then its Pod (a running worker gets SIGTERM).
        if tracked is not None and index in tracked.payload_keys:
            await self._in_pool(self._store().discard, [tracked.payload_keys[index]])
        pods = await self._call(
            self._core.list_namespaced_pod, namespace, label_selector=f"job-name={name}"
        )
        for pod in pods.get("items") or []:
            if index_of(pod) == index:
                with contextlib.suppress(KubernetesApiError):
                    await self._call(
                        self._core.delete_namespaced_pod, pod["metadata"]["name"], namespace
                    )
        if tracked is not None and tracked.open_runs <= tracked.cancelled:
            await self._delete_job(namespace, name)

    async def _delete_job(self, namespace: str, name: str) -> None:
        try:
            await self._call(
                self._batch.delete_namespaced_job, name, namespace,
                propagation_policy="Background",
            )
        except KubernetesApiError as exc:
            if exc.status != 404:
                raise

    async def release(self, handle: str) -> None:
        """The run ended: drop its payload; once every run of a Job we created has ended,
        delete the Job (``cleanup: false`` leaves it to ``ttl_seconds_after_finished``)."""
        namespace, name, index = _parse(handle)
        tracked = self._jobs.get((namespace, name))
        if tracked is None:
            return
        key = tracked.payload_keys.pop(index, None)
        if key is not None:
            await self._in_pool(self._store().discard, [key])
        tracked.open_runs.discard(index)
        if tracked.open_runs:
            return
        self._jobs.pop((namespace, name), None)
        if tracked.created and self.options.cleanup:
            await self._delete_job(namespace, name)

    async def detach(self, handle: str) -> None:
        """The Job keeps running without us; it still needs its payload."""
        namespace, name, index = _parse(handle)
        tracked = self._jobs.get((namespace, name))
        if tracked is not None:
            tracked.payload_keys.pop(index, None)
            tracked.open_runs.discard(index)
            if not tracked.open_runs:
                self._jobs.pop((namespace, name), None)

    async def aclose(self) -> None:
        if self._api is not None:
            with contextlib.suppress(Exception):
                await self._in_pool(self._api.close)
            self._api = None
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    async def doctor(self) -> list[Row]:
        rows: list[Row] = []
        if self._api is None:
            try:
                await self.start()
            except ValueError as exc:
                return [("executor_config complete", False, str(exc))]
            except Exception as exc:
                return [("Kubernetes API reachable", False, f"{exc}")]
        from kubernetes import client

        try:
            version = await self._call(client.VersionApi(self._api).get_code)
            rows.append(("Kubernetes API reachable", True,
                         f"{self._api.configuration.host} ({version.get('gitVersion', '?')})"))
        except KubernetesApiError as exc:
            return [("Kubernetes API reachable", False,
                     f"{exc}: check kubeconfig/context/host/token in executor_config")]
        try:
            await self._call(self._core.read_namespace, self.namespace)
            rows.append((f"namespace {self.namespace} exists", True, "found"))
        except KubernetesApiError as exc:
            hint = (f"kubectl create namespace {self.namespace}" if exc.status == 404
                    else "cannot read namespaces (not required if creating Jobs works)")
            rows.append((f"namespace {self.namespace} exists", exc.status == 403, f"{exc}; {hint}"))
        probe = self.manifest(
            f"wove-doctor-{secrets.token_hex(3)}", "probe#probe", {**self.config}, task_id="doctor"
        )
        rows.append(await checked_row(
            "RBAC: can create jobs (dry run)",
            self._call(self._batch.create_namespaced_job, self.namespace, probe, dry_run="All"),
            f"in {self.namespace}",
            lambda exc: f"{exc}; grant create/get/list/delete on jobs.batch and get/list/delete "
                        f"on pods in namespace {self.namespace}",
            errors=KubernetesApiError,
        ))
        rows.append(await checked_row(
            "RBAC: can list pods",
            self._call(self._core.list_namespaced_pod, self.namespace, limit=1),
            "needed to see Pods that cannot start", lambda exc: f"{exc}; grant list on pods",
            errors=KubernetesApiError,
        ))
        rows.append(await store_row(self.options.payload_store,
                                    "the Pods read them (mount the directory, or use Redis)"))
        return rows


# ---------------------------------------------------------------- helpers


def _parse(handle: str) -> tuple[str, str, int | None]:
    """``namespace/name`` or ``namespace/name#index``."""
    namespace, _, rest = handle.partition("/")
    name, _, index = rest.partition("#")
    return namespace, name, int(index) if index else None


def _api_error(exc: Any) -> KubernetesApiError:
    """The API server's Status message, not the client's multi-line dump."""
    message = ""
    with contextlib.suppress(Exception):
        body = json.loads(exc.body)
        message = body.get("message", "")
    status = int(exc.status or 0)
    return KubernetesApiError(f"{status} {exc.reason}: {message or exc.body}".strip(), status)
