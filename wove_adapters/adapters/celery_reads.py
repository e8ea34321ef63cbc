"""What the celery caller reads back from Celery, read so that nothing is unpickled.

Celery decodes a task's meta with its result backend's serializer, and control replies
(``inspect``) with the app's ``accept_content``: where either allows pickle (or YAML),
anyone who can write to the result backend or the broker runs code in the caller. So the
caller reads a key-value backend's task meta itself, as JSON (what Celery's default
``result_serializer = "json"`` writes; anything else reads as UNREADABLE), refuses at
start-up any other backend that accepts pickle or YAML, and inspects workers through a
``Control`` whose mailbox accepts JSON only. A recorded outcome inside a meta is signed
and verified by the transport before anything in it is unpickled.

Importing this module never imports celery or kombu.
"""

from __future__ import annotations

import json
from typing import Any

# Content types that execute code when decoded (Celery's "pickle" and "yaml").
UNSAFE_CONTENT = frozenset({"application/x-python-serialize", "application/x-yaml"})


def read_meta(backend: Any, task_id: str) -> dict[str, Any]:
    """The task's meta, as Celery's ``get_task_meta`` gives it, never unpickled."""
    from celery.backends.base import BaseKeyValueStoreBackend

    if not isinstance(backend, BaseKeyValueStoreBackend):
        return dict(backend.get_task_meta(task_id, cache=False))  # check_backend: no pickle
    raw = backend.get(backend.get_key_for_task(task_id))
    if raw is None:
        return {"status": "PENDING", "result": None}
    try:
        meta = json.loads(raw)
    except ValueError:  # not JSON (a pickle, say): never decoded any other way
        return {"status": "UNREADABLE", "result": None}
    return meta if isinstance(meta, dict) else {"status": "UNREADABLE", "result": None}


def check_backend(backend: Any) -> None:
    """A result backend the caller cannot read raw must not accept pickle or YAML."""
    from celery.backends.base import BaseKeyValueStoreBackend, DisabledBackend

    if isinstance(backend, (BaseKeyValueStoreBackend, DisabledBackend)):
        return
    unsafe = UNSAFE_CONTENT & {*(backend.accept or ()), backend.content_type}
    if unsafe:
        raise ValueError(
            f"celery: the result backend {type(backend).__name__} would decode "
            f"{', '.join(sorted(unsafe))} in the caller (anyone who can write to it could "
            f"run code there): set result_serializer = 'json' and result_accept_content = "
            f"['json'] in the caller's app (executor_config.celery_config)"
        )


def json_control(app: Any) -> Any:
    """The app's ``Control`` with a mailbox that decodes JSON replies only."""
    from celery.app.control import Control

    control = Control(app)
    control.mailbox.accept = ["json"]
    return control


def refused(meta: dict[str, Any]) -> bool:
    """The worker could not verify the payload: ``worker/celery.py`` raises its
    ``PayloadError`` (after signing and sending nothing), and Celery records FAILURE."""
    result = meta.get("result")
    return (
        meta.get("status") == "FAILURE"
        and isinstance(result, dict)
        and result.get("exc_type") == "PayloadError"
        and result.get("exc_module") == "wove_adapters.core.errors"
    )
