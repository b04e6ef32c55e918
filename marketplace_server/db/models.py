"""SQLAlchemy 2.0 models of everything the marketplace stores.

Times are timezone-aware UTC. Secrets are stored only as digests: passwords
with argon2id, high-entropy secrets (instance secrets, refresh tokens) with
SHA-256, pairing codes with argon2id (they are short).
"""

from __future__ import annotations

from datetime import datetime
from typing import TypeAlias

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Text,
    text,
)
from sqlalchemy.engine.default import DefaultExecutionContext
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from eddie.energy.v1 import energy_pb2
from eddie.marketplace.v1 import access_pb2, data_request_pb2, identity_pb2
from marketplace_server.db.buckets import instance_bucket

# Enum columns hold the proto enum's numbers, typed as its value type so messages take them as they are.
Role: TypeAlias = identity_pb2.Role.ValueType
DataRequestKind: TypeAlias = data_request_pb2.DataRequest.Kind.ValueType
DataRequestState: TypeAlias = data_request_pb2.DataRequest.State.ValueType
EnergyType: TypeAlias = energy_pb2.EnergyType.ValueType
PermissionState: TypeAlias = access_pb2.Permission.State.ValueType


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops tzinfo)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime")
        return value

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        from datetime import UTC

        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC) if value is not None else None


class Base(DeclarativeBase):
    pass


class AccountRow(Base):
    __tablename__ = "accounts"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    email: Mapped[str] = mapped_column(String(254))
    email_normalized: Mapped[str] = mapped_column(String(254), unique=True)
    display_name: Mapped[str] = mapped_column(String(100))
    role: Mapped[Role] = mapped_column(Integer)
    password_hash: Mapped[str] = mapped_column(String(200))
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    create_time: Mapped[datetime] = mapped_column(UtcDateTime)
    # Set by DeleteAccount: the row stays (its id is the pseudonym consent receipts name), erased.
    delete_time: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class ExternalIdentityRow(Base):
    """An account of an external OpenID Connect provider: (issuer, subject) -> the marketplace account."""

    __tablename__ = "external_identities"

    issuer: Mapped[str] = mapped_column(String(300), primary_key=True)
    subject: Mapped[str] = mapped_column(String(255), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), index=True)
    create_time: Mapped[datetime] = mapped_column(UtcDateTime)


class RefreshTokenRow(Base):
    __tablename__ = "refresh_tokens"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    family_id: Mapped[str] = mapped_column(String(32), index=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), index=True)
    create_time: Mapped[datetime] = mapped_column(UtcDateTime)
    expire_time: Mapped[datetime] = mapped_column(UtcDateTime)
    used: Mapped[bool] = mapped_column(Boolean, default=False)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


def _bucket_of_inserted(context: DefaultExecutionContext) -> int:
    """The `instances.bucket` of a row being inserted through SQLAlchemy (ORM objects, executemany,
    Core multi-row VALUES). SQLAlchemy 2.0 cannot hand a default the row of an ORM entity's
    multi-row VALUES (`insert(InstanceRow).values([...])`, its keys are Columns): that fails loudly."""
    try:
        instance_id = context.get_current_parameters()["instance_id"]  # type: ignore[no-untyped-call]
    except KeyError:
        raise ValueError(
            "instances.bucket cannot be computed for insert(InstanceRow).values([...]) with several "
            "rows: use session.execute(insert(InstanceRow), rows) or insert(InstanceRow.__table__)"
        ) from None
    return instance_bucket(str(instance_id))


class InstanceRow(Base):
    """A registered AIIDA instance; claimed once it has an owner.

    `bucket` is the cluster's bucket of the id (`db.buckets`), set on insert and never changed.
    Triggers on this table (migration 0008_bucket_claims, PostgreSQL and SQLite) keep
    `bucket_claims` in step with every insert, delete and change of `owner_id`, whichever code
    (or SQL) makes it.
    """

    __tablename__ = "instances"

    instance_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    address: Mapped[str] = mapped_column(String(300))
    secret_hash: Mapped[str] = mapped_column(String(64))
    pairing_code_hash: Mapped[str] = mapped_column(String(200))
    owner_id: Mapped[str | None] = mapped_column(ForeignKey("accounts.id"), index=True, nullable=True)
    register_time: Mapped[datetime] = mapped_column(UtcDateTime)
    claim_time: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    last_seen_time: Mapped[datetime] = mapped_column(UtcDateTime)
    bucket: Mapped[int] = mapped_column(SmallInteger, default=_bucket_of_inserted, index=True)


class DataRequestRow(Base):
    __tablename__ = "data_requests"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    # Monotonic insertion order for stable "newest first" paging.
    seq: Mapped[int] = mapped_column(Integer, unique=True)
    kind: Mapped[DataRequestKind] = mapped_column(Integer)
    title: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    purpose: Mapped[str] = mapped_column(Text)
    policy_uri: Mapped[str] = mapped_column(String(2048), default="")
    # Serialized eddie.energy.v1.DataNeed, plus the columns the filters need.
    data_need: Mapped[bytes] = mapped_column(LargeBinary)
    energy_type: Mapped[EnergyType] = mapped_column(Integer)
    # Space-separated upper-case region codes with leading/trailing spaces (" AT DE-BY "); "" = anywhere.
    regions: Mapped[str] = mapped_column(String(2000), default="")
    search_text: Mapped[str] = mapped_column(Text)
    owner_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"))
    state: Mapped[DataRequestState] = mapped_column(Integer)
    create_time: Mapped[datetime] = mapped_column(UtcDateTime)
    close_time: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)

    __table_args__ = (
        Index("ix_data_requests_state_seq", "state", "seq"),
        Index("ix_data_requests_owner_seq", "owner_id", "seq"),
        Index("ix_data_requests_energy_seq", "energy_type", "seq"),
    )


class IdempotencyKeyRow(Base):
    """AIP-155 request ids: (caller, method, request_id) -> the resource created."""

    __tablename__ = "idempotency_keys"

    account_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    method: Mapped[str] = mapped_column(String(64), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    result: Mapped[str] = mapped_column(Text)
    create_time: Mapped[datetime] = mapped_column(UtcDateTime, index=True)


class SearchRow(Base):
    __tablename__ = "searches"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    data_request_id: Mapped[str] = mapped_column(ForeignKey("data_requests.id"), index=True)
    create_time: Mapped[datetime] = mapped_column(UtcDateTime)
    queried: Mapped[int] = mapped_column(Integer)
    matched: Mapped[int] = mapped_column(Integer)
    not_matched: Mapped[int] = mapped_column(Integer)
    unreachable: Mapped[int] = mapped_column(Integer)
    timed_out: Mapped[int] = mapped_column(Integer)
    elapsed_ms: Mapped[int] = mapped_column(Integer)
    # Singling-out floor: fewer than --min-match-set matches, so no ids were kept.
    withheld: Mapped[bool] = mapped_column(Boolean, default=False)

    __table_args__ = (Index("ix_searches_create_time_id", "create_time", "id"),)


# The match set's chunks compare ids bytewise: SQLite's default (BINARY) does; PostgreSQL's depends on
# the database's locale (en_US sorts "a-b" after "ab"), so these columns say "C". Python's sort is
# the same order for the ASCII ids (resources.INSTANCE_ID).
_ID_BOUND = String(64).with_variant(String(64, collation="C"), "postgresql")
# Ids per row of `search_match_chunks`.
MATCH_CHUNK = 1000


class SearchMatchChunkRow(Base):
    """A search's match set, not a row per matched instance: its ids sorted (bytewise), MATCH_CHUNK per
    row, joined by "\n" (an instance id has none), with the first and last for range lookups.

    `seq` numbers a search's chunks from 0 in id order; the data request is the search's.
    """

    __tablename__ = "search_match_chunks"

    search_id: Mapped[str] = mapped_column(ForeignKey("searches.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    first_id: Mapped[str] = mapped_column(_ID_BOUND)
    last_id: Mapped[str] = mapped_column(_ID_BOUND)
    instance_ids: Mapped[str] = mapped_column(Text)  # last: a reader of the bounds skips it

    # The chunk that may hold an id: the last one of the search whose first id is <= it.
    __table_args__ = (Index("ix_search_match_chunks_first", "search_id", "first_id"),)


# The live states (PENDING, ACCEPTED, ACTIVE): a data request holds at most one live permission per instance.
LIVE_PERMISSION_STATES = (
    access_pb2.Permission.STATE_PENDING,
    access_pb2.Permission.STATE_ACCEPTED,
    access_pb2.Permission.STATE_ACTIVE,
)
_LIVE = text("state IN ({})".format(", ".join(str(int(s)) for s in LIVE_PERMISSION_STATES)))


class PermissionRow(Base):
    __tablename__ = "permissions"
    # API.md (RequestAccess): an instance with a live permission for a data request gets that one back,
    # never a second. The partial unique index makes that hold under concurrent requests on any replica:
    # the loser of a race fails with IntegrityError and returns the winner's permission.
    __table_args__ = (
        Index(
            "ux_permissions_live",
            "data_request_id",
            "instance_id",
            unique=True,
            sqlite_where=_LIVE,
            postgresql_where=_LIVE,
        ),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, unique=True)
    data_request_id: Mapped[str] = mapped_column(ForeignKey("data_requests.id"), index=True)
    instance_id: Mapped[str] = mapped_column(ForeignKey("instances.instance_id"), index=True)
    eligible_party_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    customer_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    state: Mapped[PermissionState] = mapped_column(Integer, index=True)
    state_reason: Mapped[str] = mapped_column(String(1000), default="")
    sink_uri: Mapped[str] = mapped_column(String(300))
    create_time: Mapped[datetime] = mapped_column(UtcDateTime)
    decision_deadline: Mapped[datetime] = mapped_column(UtcDateTime)
    decide_time: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    start_time: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    end_time: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    update_time: Mapped[datetime] = mapped_column(UtcDateTime, index=True)  # the cluster's event repair


class PermissionTransitionRow(Base):
    """Every state change of a permission, with its time and reason."""

    __tablename__ = "permission_transitions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    permission_id: Mapped[str] = mapped_column(ForeignKey("permissions.id", ondelete="CASCADE"), index=True)
    from_state: Mapped[PermissionState] = mapped_column(Integer)
    to_state: Mapped[PermissionState] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(String(1000), default="")
    time: Mapped[datetime] = mapped_column(UtcDateTime)


class OutboxRow(Base):
    """Durable deliveries to AIIDAs (configure / revoke), retried until acknowledged."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    permission_id: Mapped[str] = mapped_column(ForeignKey("permissions.id"), index=True)
    instance_id: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # "configure" | "revoke"
    payload: Mapped[dict[str, object]] = mapped_column(JSON, default=dict)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_time: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    last_error: Mapped[str] = mapped_column(String(1000), default="")
    done: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    create_time: Mapped[datetime] = mapped_column(UtcDateTime)


class ConsentReceiptRow(Base):
    """A signed consent receipt; one hash chain per customer (see services.receipts).

    No foreign keys on purpose: receipts outlive the permission's and the account's
    personal data (they name only pseudonymous ids).
    """

    __tablename__ = "consent_receipts"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    customer_id: Mapped[str] = mapped_column(String(32))
    sequence: Mapped[int] = mapped_column(Integer)
    permission_id: Mapped[str] = mapped_column(String(32), index=True)
    decision: Mapped[str] = mapped_column(String(16))
    jws: Mapped[str] = mapped_column(Text)
    create_time: Mapped[datetime] = mapped_column(UtcDateTime)

    __table_args__ = (Index("ux_consent_receipts_customer_sequence", "customer_id", "sequence", unique=True),)


class BucketLeaseRow(Base):
    """Cluster mode: which replica holds the Connect streams of one bucket of instances."""

    __tablename__ = "bucket_leases"

    bucket: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    # Increases on every takeover; writes on behalf of the bucket check it (fencing).
    token: Mapped[int] = mapped_column(BigInteger, default=0)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)


class BucketClaimRow(Base):
    """How many claimed instances (owner_id set) each bucket holds: what a cluster search's
    coordinator needs (`ClusterNode.snapshot`), in at most BUCKETS rows instead of every claimed id.

    Kept by the database itself: triggers on `instances` (migration 0008_bucket_claims) add or
    subtract one per row inserted, deleted or changing between claimed and unclaimed, in the
    writer's transaction. A bucket whose count fell to 0 keeps its row (claimed = 0).
    """

    __tablename__ = "bucket_claims"

    bucket: Mapped[int] = mapped_column(SmallInteger, primary_key=True, autoincrement=False)
    claimed: Mapped[int] = mapped_column(Integer)


class ReplicaRow(Base):
    """Cluster mode: a live replica (its heartbeat decides the buckets' fair share)."""

    __tablename__ = "replicas"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    address: Mapped[str] = mapped_column(String(300), default="")
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)


class SigningKeyRow(Base):
    """A key of the marketplace's signing key ring, shared by every process on the database.

    PostgreSQL deployments (one process or a cluster) keep the ring here instead of in
    --data-dir: the newest row is the current key, the oldest the device key AIIDAs pin
    (marketplace_server.keyring). The private key is PKCS#8 PEM: protect the table like a
    key file (database roles, encrypted backups).
    """

    __tablename__ = "signing_keys"

    # Insertion order: the highest id is the current key, the lowest the device key.
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key_id: Mapped[str] = mapped_column(String(64), unique=True)
    private_key_pem: Mapped[str] = mapped_column(Text)
    create_time: Mapped[datetime] = mapped_column(UtcDateTime)
    retire_time: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class RateLimitRow(Base):
    """Cluster mode: one rate-limit bucket (marketplace_server.ratelimit), shared by the replicas.

    `level` is a token bucket's tokens (or a failure score that decays); `idle_at` is when the
    row equals no row at all (a full bucket, a score decayed to 0), after which it is deleted.
    """

    __tablename__ = "rate_limits"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 of (limit, key)
    level: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)
    idle_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    allowed: Mapped[bool] = mapped_column(Boolean, default=True)  # the last take's answer


class CounterRow(Base):
    """Named monotonic counters (for `seq` columns), portable across backends."""

    __tablename__ = "counters"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[int] = mapped_column(Integer)


__all__ = [
    "MATCH_CHUNK",
    "AccountRow",
    "Base",
    "BucketClaimRow",
    "BucketLeaseRow",
    "ConsentReceiptRow",
    "CounterRow",
    "DataRequestRow",
    "ExternalIdentityRow",
    "IdempotencyKeyRow",
    "InstanceRow",
    "OutboxRow",
    "PermissionRow",
    "PermissionTransitionRow",
    "RateLimitRow",
    "RefreshTokenRow",
    "ReplicaRow",
    "SearchMatchChunkRow",
    "SearchRow",
    "SigningKeyRow",
]
