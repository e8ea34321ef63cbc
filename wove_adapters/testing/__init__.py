"""The conformance suite every adapter (ours or a third party's) passes.

Subclass ``AdapterConformance`` in a test module and give it one fixture, ``environment``,
returning the environment definition for a backend *and a real worker* that the fixture
started. See ``wove_adapters/testing/conformance.py``.
"""

from wove_adapters.testing.conformance import AdapterConformance

__all__ = ["AdapterConformance"]
