"""The conformance suite for one backend, stated as data.

Every backend's ``test_conformance*.py`` subclasses ``AdapterConformance`` and gives it the
same two fixtures: an ``environment`` built from the session fixture that runs the
backend (a worker, a cluster, a dev server), and ``worker_slots``, and states the same
three facts about the backend: the extra that installs its library, the library's
modules, and how long a killed or cancelled run may take to be noticed. Those facts are
one row each in ``BACKENDS``; ``BackendConformance`` writes the fixtures once, so a
backend's file says only what is its own: the executor, which fixture runs it, how many
tasks it runs at once, what it adds to the config, and the checks it overrides.

Test modules import it with ``tests/support`` on ``sys.path``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import pytest

from wove_adapters.testing import AdapterConformance


class Backend(NamedTuple):
    """What the conformance suite must know of an executor beyond its environment."""

    # Seconds a killed or cancelled run may take to be noticed (generous: the machine is
    # shared with other test runs).
    detection_timeout: float
    # The ``wove-adapters[extra]`` that installs the backend's library, and its top-level
    # modules (hidden in the missing-library test). Empty: a backend with no library.
    extra: str = ""
    library: tuple[str, ...] = ()


BACKENDS: Mapping[str, Backend] = {
    "process": Backend(20.0),
    "slurm": Backend(60.0),
    "arq": Backend(60.0, "arq", ("arq",)),  # 10 ms polls; reconciliation every 2 s
    "aws_batch": Backend(60.0, "aws", ("boto3",)),
    "celery": Backend(30.0, "celery", ("celery",)),
    "dask": Backend(45.0, "dask", ("distributed",)),
    "kubernetes_jobs": Backend(90.0, "kubernetes", ("kubernetes",)),
    "ray": Backend(30.0, "ray", ("ray",)),
    # A killed work-horse is marked failed by its worker at once; reconciliation polls
    # every second.
    "rq": Backend(45.0, "rq", ("rq",)),
    "taskiq": Backend(60.0, "taskiq", ("taskiq",)),
    "temporal": Backend(60.0, "temporal", ("temporalio",)),
}


# Backends whose workers run chunks of a mapped call (``worker.chunks``), with the http
# return path (a chunk learns of cancelled runs from the receiver's answers).
CHUNKED = frozenset({"arq", "celery", "dask", "ray", "rq", "taskiq"})


class BackendConformance(AdapterConformance):
    """``environment`` is ``{"executor": executor, "executor_config": ...}``, the config
    made by ``executor_config`` from the value of the fixture named ``service`` (none:
    the backend needs no running service), plus ``options``. ``detection_timeout``,
    ``extra`` and ``library`` come from the executor's row in ``BACKENDS``."""

    executor: str = ""
    # The fixture that runs the backend for the session; its value goes to executor_config.
    service: str | None = None
    # Tasks the backend runs at once (0: no queue, every job starts immediately).
    slots: int = 1
    # Added to every executor_config: a return path, a batching window.
    options: Mapping[str, Any] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.executor:
            cls.detection_timeout, cls.extra, cls.library = BACKENDS[cls.executor]
            if "chunks" not in cls.__dict__:  # a class may say otherwise (its return path)
                cls.chunks = (cls.executor in CHUNKED
                              and cls.options.get("return_path", "http") == "http")

    def executor_config(self, service: Any) -> dict[str, Any]:
        """The executor_config for the running ``service``; by default the service
        fixture's value is that config (a mapping), or nothing without a service."""
        return dict(service or {})

    @pytest.fixture
    def environment(self, request: pytest.FixtureRequest) -> dict[str, Any]:
        service = request.getfixturevalue(self.service) if self.service else None
        config = {**self.executor_config(service), **self.options}
        return {"executor": self.executor, "executor_config": config}

    @pytest.fixture
    def worker_slots(self) -> int:
        return self.slots
