"""AWS Batch (moto in server mode + the Docker Engine API shim, every job a real local
process): native ``submit_job`` + polling ``describe_jobs`` until SUCCEEDED vs ours
(``Hub.run`` / ``Hub.map``, payload in S3, result back over HTTP).

- sequential round trips, native and ours interleaved sample by sample: a native job runs
  ``python -c 'print(x + 1)'`` and is done when describe_jobs says SUCCEEDED (polled every
  ``--poll`` seconds); ours runs ``x + 1`` through ``python -m wove_adapters.worker``;
- a burst of N tasks submitted at once: native is one array job of size N (each child
  computes index + 1, done when the parent is SUCCEEDED); ours is ``Hub.map`` (one array
  job too). A control, ``native_s3_input``, is the same native array job whose children
  read their input from S3 with botocore, as our worker reads its payload: on this
  2-core machine every "container" shares the caller's CPUs, so a job's Python start-up
  (botocore alone is ~0.2 s) decides burst throughput;
- 100 mapped items as one array job vs 100 separate SubmitJob calls (ours).

Starts its own moto_server and shim (``tests/integration/aws_batch/aws_batch_services.py``),
stops them by PID, and prints one JSON line:

    python benchmarks/bench_aws_batch.py [--seq 200] [--burst 300] [--rounds 1]
                                         [--max-running 16] [--poll 0.05]

moto's batch backend polls each container every 0.5 s and walks every job through
SUBMITTED..RUNNING with 0.5 s sleeps in between, so absolute numbers say more about moto
than about AWS; the comparison is what matters.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests" / "integration" / "aws_batch"))

import aws_batch_services as services  # noqa: E402
from common import alternate, emit, hub_calls, ratio, speed_arguments, summarize  # noqa: E402

CHILD_INDEX = (
    "import os; index = int(os.environ.get('AWS_BATCH_JOB_ARRAY_INDEX') or "
    "os.environ['AWS_BATCH_JOB_ID'].rsplit(':', 1)[1]); "
)
CHILD_PLUS_ONE = CHILD_INDEX + "print(index + 1)"
# The control: a native job that reads its input from S3, as ours reads its payload.
CHILD_S3_PLUS_ONE = CHILD_INDEX + (
    "import botocore.session; s3 = botocore.session.Session().create_client("
    "'s3', region_name='{region}', endpoint_url='{endpoint}'); "
    "body = s3.get_object(Bucket='{bucket}', Key=f'native-in/{{index}}')['Body'].read(); "
    "print(int(body) + 1)"
)


def add_one(x: int) -> int:
    return x + 1


class Native:
    """The backend's own path: SubmitJob, then DescribeJobs until the job is finished.
    It learns that a job SUCCEEDED, not what it printed: its sides are ``unchecked``."""

    def __init__(self, stack: services.BatchStack, poll: float) -> None:
        self.stack = stack
        self.batch = stack.client("batch")
        self.queue = stack.names["queue"]
        self.definition = stack.names["definition"]
        self.poll = poll

    def _submit(self, command: list[str], size: int = 0) -> str:
        request: dict[str, Any] = {
            "jobName": f"native-{uuid.uuid4().hex[:12]}", "jobQueue": self.queue,
            "jobDefinition": self.definition, "containerOverrides": {"command": command},
        }
        if size:
            request["arrayProperties"] = {"size": size}
        return str(self.batch.submit_job(**request)["jobId"])

    def _wait(self, job_id: str, timeout: float = 900.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.batch.describe_jobs(jobs=[job_id])["jobs"][0]
            if job["status"] == "SUCCEEDED":
                return
            # moto never marks an array parent FAILED: look at its children's summary.
            failed = job.get("arrayProperties", {}).get("statusSummary", {}).get("FAILED", 0)
            if job["status"] == "FAILED" or failed:
                raise RuntimeError(f"native job {job_id} FAILED")
            time.sleep(self.poll)
        raise TimeoutError(f"native job {job_id} did not finish in {timeout}s")

    def once(self, x: int) -> None:
        self._wait(self._submit([sys.executable, "-c", f"print({x} + 1)"]))

    def burst(self, n: int) -> None:
        self._wait(self._submit([sys.executable, "-c", CHILD_PLUS_ONE], size=n))

    def burst_s3_input(self, n: int) -> None:
        """Inputs uploaded to S3 (16 at a time), one array job whose children read them."""
        from concurrent.futures import ThreadPoolExecutor

        s3 = self.stack.client("s3")
        bucket = self.stack.names["bucket"]
        code = CHILD_S3_PLUS_ONE.format(
            region=services.REGION, endpoint=self.stack.endpoint_url, bucket=bucket
        )
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(
                lambda i: s3.put_object(Bucket=bucket, Key=f"native-in/{i}", Body=str(i)),
                range(n),
            ))
        self._wait(self._submit([sys.executable, "-c", code], size=n))


def main() -> None:
    # 1000 at once overwhelms moto here: each child is a thread polling its container
    # every 0.5 s over a fresh Docker client (timeouts, then EMFILE). 300 stays sound.
    parser = speed_arguments(burst=300, rounds=1)
    parser.add_argument("--max-running", type=int, default=16)
    parser.add_argument("--poll", type=float, default=0.05)
    parser.add_argument("--skip-array-compare", action="store_true")
    options = parser.parse_args()

    os.environ.setdefault("WOVE_ADAPTERS_HOME", tempfile.mkdtemp(prefix="wove-bench-aws-home-"))
    from wove_adapters import Hub

    stack = services.start_stack(
        Path(tempfile.mkdtemp(prefix="wove-bench-aws-")), max_running=options.max_running
    )
    result: dict[str, Any] = {"backend": "aws_batch"}
    try:
        config = stack.executor_config
        native = Native(stack, options.poll)
        with Hub(environments={"b": {"executor": "aws_batch", "executor_config": config}},
                 default_environment="b") as hub:
            # 3 untimed round trips each (clients, receiver, page cache), then turns;
            # the S3-input control only bursts.
            measured = alternate({
                "native": (native.once, native.burst),
                "native_s3_input": (None, native.burst_s3_input),
                "ours": hub_calls(hub, add_one),
            }, seq=options.seq, burst=options.burst, rounds=options.rounds, warmup=3,
                unchecked=("native", "native_s3_input"))
            for side in ("native", "ours"):
                result[side] = summarize(*measured[side], digits=1, rate_digits=2)
            result["native_s3_input"] = {
                "throughput_per_s": round(statistics.median(measured["native_s3_input"][1]), 2)}
            if not options.skip_array_compare:
                adapter = hub.dispatcher("b").transport.adapter  # type: ignore[attr-defined]
                before = adapter.submissions
                start = time.perf_counter()
                assert hub.map(add_one, range(100)) == [i + 1 for i in range(100)]
                result["array_100"] = {"submissions": adapter.submissions - before,
                                       "seconds": round(time.perf_counter() - start, 2)}
        if not options.skip_array_compare:
            keyed = {"executor": "aws_batch", "executor_config": config,
                     "delivery_idempotency_key": "{x}-" + uuid.uuid4().hex}
            with Hub(environments={"k": keyed}, default_environment="k") as hub:
                adapter = hub.dispatcher("k").transport.adapter  # type: ignore[attr-defined]
                start = time.perf_counter()
                assert hub.map(add_one, range(100)) == [i + 1 for i in range(100)]
                result["single_100"] = {"submissions": adapter.submissions,
                                        "seconds": round(time.perf_counter() - start, 2)}
        result["settings"] = {"seq": options.seq, "burst": options.burst,
                              "rounds": options.rounds, "max_running": options.max_running,
                              "poll_s": options.poll, "load_avg_1m": os.getloadavg()[0]}
        ours_rate = result["ours"]["throughput_per_s"]
        result["ratios"] = {
            "p50_ours_over_native": ratio(result["ours"]["p50_ms"], result["native"]["p50_ms"]),
            "throughput_ours_over_native": ratio(ours_rate, result["native"]["throughput_per_s"]),
            "throughput_ours_over_native_s3_input": ratio(
                ours_rate, result["native_s3_input"]["throughput_per_s"]),
        }
    finally:
        services.stop_stack(stack)
    emit(result)


if __name__ == "__main__":
    main()
