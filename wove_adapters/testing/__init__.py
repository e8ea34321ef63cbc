"""The conformance suite every adapter (ours or a third party's) passes.

Subclass ``AdapterConformance`` in a test module and give it one fixture, ``environment``,
returning the environment definition for a backend *and a real worker* that the fixture
started. See ``wove_adapters/testing/conformance.py``.

``AdapterConformance`` is imported on first use: workers import
``wove_adapters.testing.tasks`` to run test and benchmark tasks, and must not pay for
pytest and the Hub that the suite needs.
"""

from typing import Any

__all__ = ["AdapterConformance"]


def __getattr__(name: str) -> Any:
    if name == "AdapterConformance":
        from wove_adapters.testing.conformance import AdapterConformance

        return AdapterConformance
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
