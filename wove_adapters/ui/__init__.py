"""The live runs page: ``wove-adapters ui``, or ``serve(hub=...)`` inside a program.

A small aiohttp server over the run ledger: every run of every environment, newest first,
filtered by environment, task, state and time; a run's detail with its verified outcome
(error kind, message, remote traceback); live updates; cancel for runs in flight in the
serving process, and for backend jobs of the loaded configuration's environments that one
unfinished run owns alone; ``/api/runs`` as JSON and ``/metrics`` as Prometheus text. It
only reads the ledger (and cancels through this process's dispatchers or the environment's
adapter): it never unpickles anything.
See docs/observability.md, "UI".
"""

from wove_adapters.ui.server import (
    DEFAULT_LISTEN,
    TOKEN_ENV,
    UIConfigError,
    UIServer,
    serve,
    start,
)

__all__ = ["DEFAULT_LISTEN", "TOKEN_ENV", "UIConfigError", "UIServer", "serve", "start"]
