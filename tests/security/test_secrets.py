"""No secret rides in a payload, and `wove-adapters config` shows none.

- the ledger URL in an envelope has no password (nor secret query parameters): a broker,
  spool or Job spec reader learns nothing; the worker adds the credentials from its own
  ``WOVE_ADAPTERS_LEDGER``;
- every secret form is masked in `wove-adapters config`: passwords holding ``/`` or ``@``,
  passwords in query strings, the receiver's path token inside ``callback_url``.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

from wove_adapters.core import envelope as payload_mod
from wove_adapters.core import signing
from wove_adapters.core.errors import ledger_url_for_worker, redact_url, strip_credentials
from wove_adapters.testing import tasks

PASSWORD = "pa/ss@w0rd"
LEDGER = f"postgresql://bob:{PASSWORD}@127.0.0.1:5432/app?sslmode=disable&password=qq-secret"


def test_the_ledger_password_never_travels_in_a_payload() -> None:
    envelope = payload_mod.build_envelope(
        adapter="process", run_id="r:1", task_id="add", attempt=1, func=tasks.add,
        args={"x": 1}, return_path=payload_mod.ReturnPath(url="http://127.0.0.1:9/x"),
        delivery={}, key_id=signing.KEYRING.add(b"secrets-test-key"), inline_limit=1 << 20,
        store_url=None, ledger=LEDGER,
    )
    text = payload_mod.encode_payload(envelope)
    raw = base64.urlsafe_b64decode(text[len(payload_mod.PAYLOAD_PREFIX):])
    for secret in (PASSWORD, "qq-secret", "pa/ss"):
        assert secret.encode() not in raw, f"{secret!r} travels in the payload"
    assert envelope.ledger == "postgresql://bob@127.0.0.1:5432/app?sslmode=disable"


def test_the_worker_adds_credentials_from_its_own_configuration(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    travelled = strip_credentials(LEDGER)
    monkeypatch.delenv("WOVE_ADAPTERS_LEDGER", raising=False)
    assert ledger_url_for_worker(travelled) == travelled
    monkeypatch.setenv("WOVE_ADAPTERS_LEDGER", LEDGER)
    assert ledger_url_for_worker(travelled) == LEDGER
    # The worker's credentials are never handed to another ledger a payload names.
    assert ledger_url_for_worker("postgresql://bob@evil.example/app") == (
        "postgresql://bob@evil.example/app"
    )


@pytest.mark.parametrize(
    ("url", "hidden"),
    [
        ("redis://:pa/ss@w0rd@127.0.0.1:6379/0", "pa/ss@w0rd"),
        ("postgresql://bob:s@cr@t@db/app", "s@cr@t"),
        ("postgresql://bob@db/app?password=in-query", "in-query"),
        ("https://cb.example/wove/events/tok-123?x=1", "tok-123"),
        ("amqp://guest:guest@127.0.0.1:5672//", "guest@"),
    ],
)
def test_redaction_hides_every_secret_form(url: str, hidden: str) -> None:
    assert hidden not in redact_url(url)


def test_config_command_masks_every_secret_form(tmp_path: Path) -> None:
    config = tmp_path / "wove_config.toml"
    config.write_text(
        f'ledger = "{LEDGER}"\n'
        "[environments.jobs]\n"
        'executor = "celery"\n'
        "[environments.jobs.executor_config]\n"
        'broker_url = "redis://:br@ker/pw@127.0.0.1:6379/5"\n'
        'callback_url = "https://cb.example/wove/events/route-token-9"\n'
        'secret = "literal-key-material"\n'
    )
    shown = subprocess.run(
        [sys.executable, "-m", "wove_adapters.cli", "config", "--config", str(config),
         "--format", "json"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert shown.returncode == 0, shown.stderr
    json.loads(shown.stdout)  # still a valid document
    for secret in (PASSWORD, "qq-secret", "br@ker/pw", "route-token-9", "literal-key-material"):
        assert secret not in shown.stdout, f"{secret!r} shown by wove-adapters config"
