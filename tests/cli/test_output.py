"""`--output json`: the protobuf JSON form with every field, defaults included, names as protobuf
JSON spells them (camelCase)."""

from __future__ import annotations

import json

import pytest

from eddie.marketplace.v1 import access_pb2, consent_pb2, data_request_pb2
from eddie_cli import output


def test_zero_counts_false_flags_and_empty_lists_are_printed() -> None:
    summary = data_request_pb2.SearchSummary(search="dataRequests/a/searches/b", queried=3, matched=0)
    document = output.to_json(summary)
    assert isinstance(document, dict)
    assert document["queried"] == 3
    assert document["matched"] == 0 and document["notMatched"] == 0 and document["timedOut"] == 0
    assert document["withheld"] is False
    assert "elapsed" not in document  # an unset message has presence: still left out
    listed = output.to_json(access_pb2.ListPermissionsResponse())
    assert listed == {"permissions": [], "nextPageToken": ""}


def test_an_unset_oneof_member_stays_out(capsys: pytest.CaptureFixture[str]) -> None:
    answer = consent_pb2.ConnectResponse(
        decision_error=consent_pb2.DecisionError(permission="permissions/x", reason="NOT_PENDING")
    )
    output.print_json_line(answer)
    [line] = capsys.readouterr().out.splitlines()
    assert set(json.loads(line)) == {"decisionError"}
    assert json.loads(line)["decisionError"]["code"] == 0
