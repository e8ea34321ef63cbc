"""Traces (OpenTelemetry) and metrics (Prometheus) of runs, each behind its own extra.

Turned on by the settings ``tracing = true`` and ``metrics = true | "PORT" |
"HOST:PORT"`` (applied by the first dispatcher of the process, see docs/observability.md)
or by calling ``wove_adapters.observability.tracing.install()`` /
``wove_adapters.observability.metrics.install(registry=..., port=...)``. This package
imports neither library itself: ``tracing`` and ``metrics`` do, and only when asked for;
an absent library is an ``ObservabilityExtraMissing`` naming the extra to install.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from wove_adapters.core.errors import WoveAdaptersError

__all__ = ["ObservabilityExtraMissing", "apply_settings", "metrics_target"]


class ObservabilityExtraMissing(WoveAdaptersError, ModuleNotFoundError):
    """Tracing or metrics was asked for, and the library behind it is not installed."""

    def __init__(self, feature: str, module: str, extra: str) -> None:
        super().__init__(
            f"{feature} needs the Python module '{module}', which is not installed. Install "
            f"it with: pip install 'wove-adapters[{extra}]' (or turn {feature} off)",
            name=module,
        )
        self.extra = extra


def require(module: str, feature: str, extra: str, exc: ModuleNotFoundError) -> None:
    """Re-raise ``exc`` as ``ObservabilityExtraMissing`` if it is ``module`` that is
    missing; anything else (a bug inside the library) surfaces as itself."""
    missing = exc.name or ""
    if missing == module or missing.startswith(f"{module}."):
        raise ObservabilityExtraMissing(feature, module, extra) from exc
    raise exc


def metrics_target(value: Any) -> tuple[str, int] | None:
    """Where ``metrics`` asks for the scrape endpoint: ``(host, port)``, or None for
    "the default registry only" (``true``). ``false``/unset is not a target: see
    ``apply_settings``. A bad value raises ValueError naming the setting and the forms."""
    forms = (
        "metrics must be true (the default prometheus_client registry, exposed by the "
        "program), a port (9464, \"9464\", \"port:9464\") or \"HOST:PORT\" "
        "(\"127.0.0.1:9464\")"
    )
    if value is True:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        host, port_text = "127.0.0.1", str(value)
    elif isinstance(value, str):
        text = value.strip()
        if _on(text):
            return None
        host, _, port_text = text.rpartition(":")
        if host in ("", "port"):
            host = "127.0.0.1"
    else:
        raise ValueError(f"{forms}; got {value!r}")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{forms}; got {value!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"{forms}; port {port} is out of range; got {value!r}")
    return host, port


_lock = threading.Lock()
_applied: set[tuple[str, Any]] = set()


def _on(text: str) -> bool:
    """A word that says "on" (settings from TOML, variables or code alike)."""
    return text.strip().lower() in ("true", "yes", "on", "1")


def _off(value: Any) -> bool:
    return value is None or value is False or (
        isinstance(value, str) and value.strip().lower() in ("", "false", "no", "off", "0")
    )


def apply_settings(settings: Mapping[str, Any]) -> None:
    """``tracing`` and ``metrics`` from resolved settings: each value is applied once per
    process (the first dispatcher that carries it installs the observer); a setting that
    is off changes nothing (an observer installed by code stays)."""
    tracing, metrics = settings.get("tracing"), settings.get("metrics")
    if _off(tracing) and _off(metrics):
        return
    with _lock:
        todo = [(name, value) for name, value in (("tracing", tracing), ("metrics", metrics))
                if not _off(value) and (name, repr(value)) not in _applied]
        for name, value in todo:
            if name == "tracing":
                if value is not True and not _on(str(value)):
                    raise ValueError(f"tracing must be true or false; got {value!r}")
                from wove_adapters.observability import tracing as tracing_mod

                tracing_mod.install()
            else:
                target = metrics_target(value)
                from wove_adapters.observability import metrics as metrics_mod

                if target is None:
                    metrics_mod.install()
                else:
                    metrics_mod.install(port=target[1], addr=target[0])
            _applied.add((name, repr(value)))
