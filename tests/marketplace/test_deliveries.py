"""The outbox contract: payloads survive the JSON column unchanged, and bad ones are refused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from marketplace_server.db.chunks import chunked
from marketplace_server.db.models import PermissionRow
from marketplace_server.deliveries import ConfigurePayload, RevokePayload

START = datetime(2026, 12, 4, 20, 0, tzinfo=UTC)


def _accepted(**overrides: object) -> PermissionRow:
    fields: dict[str, object] = {
        "id": "p1",
        "eligible_party_id": "ep1",
        "sink_uri": "grpcs://sink.example:443",
        "start_time": START,
        "end_time": START + timedelta(days=30),
    }
    fields.update(overrides)
    return PermissionRow(**fields)


def test_a_configure_payload_round_trips_through_json() -> None:
    payload = ConfigurePayload.of(_accepted(), b"\x08\x01\x12\x00")
    assert payload.eligible_party == "accounts/ep1"
    assert ConfigurePayload.from_json(payload.to_json()) == payload


def test_the_stored_configure_json_keeps_its_shape() -> None:
    """Rows written before a restart (or an upgrade) are read back by the same keys."""
    stored = ConfigurePayload.of(_accepted(), b"need").to_json()
    assert stored == {
        "data_need": "bmVlZA==",
        "sink_uri": "grpcs://sink.example:443",
        "start_time": "2026-12-04T20:00:00+00:00",
        "end_time": "2027-01-03T20:00:00+00:00",
        "eligible_party": "accounts/ep1",
    }


def test_a_permission_without_a_data_window_has_no_configure_payload() -> None:
    with pytest.raises(ValueError, match="data window"):
        ConfigurePayload.of(_accepted(end_time=None), b"need")


@pytest.mark.parametrize(
    "broken",
    [{}, {"data_need": 1}, {"data_need": "!!", "sink_uri": "", "start_time": "", "end_time": ""}],
)
def test_a_malformed_configure_payload_is_refused(broken: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="outbox payload"):
        ConfigurePayload.from_json(broken)


def test_a_revoke_payload_round_trips_and_tolerates_a_missing_reason() -> None:
    assert RevokePayload.from_json(RevokePayload("ended").to_json()) == RevokePayload("ended")
    assert RevokePayload.from_json({}) == RevokePayload("")


def test_chunked_splits_in_order_into_pieces_of_at_most_the_size() -> None:
    assert list(chunked(list(range(7)), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(chunked([], 3)) == []
    assert [len(c) for c in chunked(list(range(1001)))] == [500, 500, 1]
