"""delivery_max_pending_seconds and the dispatcher's thresholds: parsed, validated, named."""

from __future__ import annotations

from typing import Any

import pytest

from wove_adapters.core.config import load_config
from wove_adapters.core.ledger import open_ledger
from wove_adapters.core.policies import DeliveryPolicy
from wove_adapters.core.runtime import Dispatcher


@pytest.mark.parametrize(
    ("value", "expected"), [(None, None), (2, 2.0), ("1.5", 1.5), (0, None), (-3, None)]
)
def test_policy_reads_max_pending_seconds(value: Any, expected: float | None) -> None:
    policy = DeliveryPolicy.from_settings({"delivery_max_pending_seconds": value})
    assert policy.max_pending_seconds == expected


@pytest.mark.parametrize("value", ["soon", True, [1], float("nan")])
def test_policy_refuses_what_is_not_a_number_of_seconds(value: Any) -> None:
    with pytest.raises(ValueError, match="Environment 'jobs' has invalid "
                                         "delivery_max_pending_seconds"):
        DeliveryPolicy.from_settings(
            {"delivery_max_pending_seconds": value}, where="Environment 'jobs'"
        )


def test_configuration_knows_the_key_and_checks_its_type() -> None:
    config = load_config(
        {"environments": {"jobs": {"delivery_max_pending_seconds": 30}}}, environ={}
    )
    assert config.task_settings("t", environment="jobs")["delivery_max_pending_seconds"] == 30.0
    with pytest.raises(ValueError, match="delivery_max_pending_seconds in environment 'jobs' "
                                         "must be of type float"):
        load_config(
            {"environments": {"jobs": {"delivery_max_pending_seconds": "soon"}}}, environ={}
        )
    from_environ = load_config(
        {"environments": {"jobs": {}}},
        environ={"WOVE__ENVIRONMENTS__JOBS__DELIVERY_MAX_PENDING_SECONDS": "12.5"},
    )
    assert from_environ.task_settings("t", environment="jobs")[
        "delivery_max_pending_seconds"
    ] == 12.5


@pytest.mark.parametrize(
    "key", ["pending_warning_seconds", "stall_grace_seconds", "cancel_release_seconds"]
)
@pytest.mark.parametrize("value", ["soon", 0, -1, True])
def test_dispatcher_refuses_bad_thresholds_naming_the_key(key: str, value: Any) -> None:
    from wove_adapters.core.executors.local import LocalTransport

    with pytest.raises(ValueError, match=f"Environment 'jobs': executor_config.{key} must be"):
        Dispatcher(
            environment="jobs",
            transport=LocalTransport(),
            executor_config={key: value},
            settings={},
            ledger=open_ledger("memory://"),
            key_id="k",
        )
