"""How a mapped call is cut into chunks, and how a chunk travels."""

from __future__ import annotations

import pytest

from wove_adapters.core import envelope as payload_mod
from wove_adapters.core.chunking import MAX_CHUNK, UNMEASURED, chunk_size
from wove_adapters.core.errors import PayloadError


def test_off_values_send_each_run_alone() -> None:
    for off in (0, 1, None, False, "off"):
        assert chunk_size(off, 1000, None, None) == 1


def test_auto_sizes_from_the_measured_task_time() -> None:
    assert chunk_size("auto", 1000, None, None) == UNMEASURED  # not measured yet
    assert chunk_size("auto", 10_000, 0.001, None) == 100  # ~0.1 s of work per chunk
    assert chunk_size("auto", 10_000, 0.0, None) == MAX_CHUNK
    assert chunk_size("auto", 10_000, 0.5, None) == 1  # long tasks go alone
    assert chunk_size("auto", 40, 0.001, None) == 5  # spread over >= 8 chunks


def test_a_number_is_kept_within_the_call_and_its_in_flight_cap() -> None:
    assert chunk_size(50, 1000, None, None) == 50
    assert chunk_size(50, 20, None, None) == 20
    assert chunk_size(50, 1000, None, 8) == 8  # a chunk leaves once all its runs are in flight


@pytest.mark.parametrize("bad", [-3, "many", 2.5, True])
def test_a_bad_setting_names_it_and_the_allowed_values(bad: object) -> None:
    with pytest.raises(ValueError, match="map_chunk_size must be a positive whole number"):
        chunk_size(bad, 100, None, None)


def test_a_chunk_is_its_pieces_in_order() -> None:
    pieces = ["wove1.AAA", "wove1.B-_=", "wove1.C"]
    text = payload_mod.encode_chunk(pieces)
    assert payload_mod.is_chunk(text) and payload_mod.is_chunk(text.encode())
    assert not payload_mod.is_chunk(pieces[0])
    assert payload_mod.split_chunk(text) == pieces
    with pytest.raises(PayloadError, match="not a wove-adapters chunk"):
        payload_mod.split_chunk(pieces[0])
