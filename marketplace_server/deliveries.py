"""The outbox contract: what a workflow queues for an AIIDA, and what the outbox worker sends.

A permission transaction adds an `OutboxRow` of one kind with one payload; the
worker (`aiida.outbox`) reads it back, possibly after a restart, so the payload
is stored as JSON. This module is below both: it imports neither the workflows
nor the worker.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal

from marketplace_server.db.models import PermissionRow
from marketplace_server.resources import account_name

__all__ = ["CONFIGURE", "REVOKE", "ConfigurePayload", "DeliveryKind", "RevokePayload"]

DeliveryKind = Literal["configure", "revoke"]
CONFIGURE: Final = "configure"
REVOKE: Final = "revoke"


def _text(data: Mapping[str, object], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise ValueError(f"outbox payload: {key} must be a string")
    return value


@dataclass(frozen=True)
class ConfigurePayload:
    """What a configure needs besides the row's columns; the sink token is issued at delivery."""

    data_need: bytes  # a serialized eddie.energy.v1.DataNeed
    sink_uri: str
    start_time: datetime
    end_time: datetime
    eligible_party: str  # accounts/{id}

    @classmethod
    def of(cls, row: PermissionRow, data_need: bytes) -> ConfigurePayload:
        """The payload of an accepted permission (its data window is set)."""
        if row.start_time is None or row.end_time is None:
            raise ValueError(f"permission {row.id} has no data window to configure")
        return cls(data_need, row.sink_uri, row.start_time, row.end_time, account_name(row.eligible_party_id))

    def to_json(self) -> dict[str, object]:
        return {
            "data_need": base64.b64encode(self.data_need).decode(),
            "sink_uri": self.sink_uri,
            "start_time": self.start_time.isoformat(),
            "end_time": self.end_time.isoformat(),
            "eligible_party": self.eligible_party,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> ConfigurePayload:
        """The payload as stored; ValueError if it is not one."""
        try:
            data_need = base64.b64decode(_text(data, "data_need"), validate=True)
        except binascii.Error as exc:
            raise ValueError("outbox payload: data_need is not base64") from exc
        return cls(
            data_need=data_need,
            sink_uri=_text(data, "sink_uri"),
            start_time=datetime.fromisoformat(_text(data, "start_time")),
            end_time=datetime.fromisoformat(_text(data, "end_time")),
            eligible_party=_text(data, "eligible_party"),
        )


@dataclass(frozen=True)
class RevokePayload:
    """Why the access ends (shown at the AIIDA)."""

    reason: str

    def to_json(self) -> dict[str, object]:
        return {"reason": self.reason}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> RevokePayload:
        reason = data.get("reason", "")
        return cls(reason if isinstance(reason, str) else "")
