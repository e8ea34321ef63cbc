"""process: a new Python process per task, natively (``subprocess.run([python, "-c",
...])``) vs ours (``Hub`` with the ``process`` adapter: ``python -m wove_adapters.worker``
with a signed payload file, events back to the HTTP receiver), interleaved in one run.

Both sides start one interpreter per task and run ``x + 1`` in it. Bursts run at most
``--in-flight`` processes at once on both sides (native: a thread pool of that size
calling ``subprocess.run``; ours: ``delivery_max_in_flight``): a thousand interpreters
at once would exhaust a small machine, and the process adapter has no cap of its own.
The burst defaults to 200 tasks for that reason (one process each).

wove 2.0.3 has no executor that starts a process per task (its ``stdio`` keeps one
worker process; see ``bench_stdio.py``), so there is no wove side here.

    python benchmarks/bench_process.py [--seq 200] [--burst 200] [--rounds 3]
                                       [--in-flight 8]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Side, emit, hub_side, interleave, settings_of, speed_arguments, two_way_record

NATIVE_CODE = "import sys; print(int(sys.argv[1]) + 1)"


def add_one(x: int) -> int:
    """Ours' task, pickled by value: importing ``wove_adapters.testing.tasks`` in every
    fresh worker would also import ``wove_adapters.testing`` (and pytest with it)."""
    return x + 1


def native_one(x: int) -> int:
    done = subprocess.run([sys.executable, "-c", NATIVE_CODE, str(x)], check=True,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    return int(done.stdout)


def main() -> None:
    parser = speed_arguments(__doc__.split("\n\n")[0], burst=200)
    parser.add_argument("--in-flight", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("WOVE_ADAPTERS_HOME", tempfile.mkdtemp(prefix="wove-bench-process-"))

    from wove_adapters.integration.hub import Hub

    pool = ThreadPoolExecutor(max_workers=args.in_flight)
    hub = Hub(environments={"proc": {"executor": "process",
                                     "delivery_max_in_flight": args.in_flight}},
              default_environment="proc")
    try:
        sides = [
            Side("native", native_one, lambda n: list(pool.map(native_one, range(n)))),
            hub_side(hub, fn=add_one),
        ]
        measured = interleave(sides, seq=args.seq, burst=args.burst, rounds=args.rounds,
                              warmup=5, label="process")
    finally:
        hub.close()
        pool.shutdown(wait=True)
    emit(two_way_record(
        "process", measured,
        wove=None,
        wove_note="wove 2.0.3 has no executor that starts one process per task (its "
                  "stdio executor keeps one long-lived worker: compared under stdio)",
        native_description=f"subprocess.run([python, '-c', ...]) per task; bursts on "
                           f"a {args.in_flight}-thread pool",
        ours_description=f"Hub process adapter, delivery_max_in_flight={args.in_flight}",
        settings=settings_of(args, in_flight=args.in_flight),
    ))


if __name__ == "__main__":
    main()
