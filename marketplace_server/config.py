"""The marketplace's configuration: each option declared once, as a field with its flag."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from eddie_common.flags import (
    Program,
    at_least,
    file_flag,
    flag,
    grace_period_flag,
    host_port,
    log_level_flag,
    metrics_listen_flag,
    positive,
)
from eddie_common.serving import TlsFiles


def database_url(value: str) -> None:
    """An SQLAlchemy URL of an asyncio driver (sqlite+aiosqlite, postgresql+asyncpg)."""
    try:
        url = make_url(value)
        dialect = url.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError):
        raise ValueError(
            "expected an SQLAlchemy URL such as postgresql+asyncpg://user@host/db "
            f"(got {value.split('://')[0]!r}...)"
        ) from None
    if not getattr(dialect, "is_async", False):
        raise ValueError(
            f"{url.drivername!r} is not an asyncio driver: use postgresql+asyncpg or sqlite+aiosqlite"
        )


def http_url(value: str) -> None:
    """An absolute http(s) URL (an OpenID Connect issuer)."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"expected an http(s) URL such as https://sso.example.org/realms/x, got {value!r}")


def nats_url(value: str) -> None:
    """A NATS server URL (nats://host:port, tls://host:port)."""
    parts = urlsplit(value)
    if parts.scheme not in ("nats", "tls") or not parts.netloc:
        raise ValueError(f"expected a NATS URL such as nats://127.0.0.1:4222, got {value!r}")


def subject_token(value: str) -> None:
    """One NATS subject token: letters, digits, '-' and '_'."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value):
        raise ValueError(f"expected letters, digits, '-' or '_' (one NATS subject token), got {value!r}")


@dataclass(frozen=True)
class Config:
    """Everything `create_server` needs; tests build one directly."""

    listen: str = flag(
        "HOST:PORT to serve gRPC on (port 0 picks a free port)",
        default="127.0.0.1:50051",
        metavar="HOST:PORT",
        check=host_port,
    )
    data_dir: Path = flag(
        "directory for the default SQLite database and its signing keys (with PostgreSQL the keys "
        "live in the database; keys found here are imported on its first start)",
        default=Path("var/marketplace"),
        metavar="DIR",
    )
    database_url: str | None = flag(
        "SQLAlchemy async URL, e.g. postgresql+asyncpg://user@host/db (default: SQLite in --data-dir)",
        default=None,
        metavar="URL",
        check=database_url,
    )
    database_schema: str | None = flag(
        "PostgreSQL schema to keep the tables in (must exist; default: the user's search_path)",
        default=None,
        metavar="SCHEMA",
    )
    issuer: str = flag("the `iss` claim of every token the marketplace signs", default="eddie-marketplace")
    access_token_ttl: float = flag(
        "access token lifetime, seconds", default=900.0, metavar="SECONDS", check=positive
    )
    refresh_token_ttl: float = flag(
        "refresh token lifetime, seconds", default=30 * 86400.0, metavar="SECONDS", check=positive
    )
    aiida_token_ttl: float = flag(
        "lifetime of the tokens the marketplace presents to AIIDAs, seconds",
        default=300.0,
        metavar="SECONDS",
        check=positive,
    )
    decision_timeout: float = flag(
        "how long a customer has to decide on an access request, seconds (default 7 days)",
        default=7 * 86400.0,
        metavar="SECONDS",
        check=positive,
    )
    search_timeout_default: float = flag(
        "default time a search waits for AIIDA answers, seconds",
        name="search-timeout",
        default=3.0,
        metavar="SECONDS",
        check=positive,
    )
    search_timeout_max: float = flag(
        "largest search timeout a caller may ask for, seconds",
        default=60.0,
        metavar="SECONDS",
        check=positive,
    )
    search_rate_per_minute: float = flag(
        "searches an eligible party may start per minute",
        name="search-rate",
        default=60.0,
        metavar="N",
        check=positive,
    )
    # Singling-out floor: a search matching 0 < n < K instances streams and stores no ids.
    min_match_set: int = flag(
        "singling-out floor K: a search matching fewer than K instances (but some) streams and "
        "stores no ids and says withheld (default 1 = off; 5 or more recommended in production)",
        default=1,
        metavar="K",
        check=at_least(1),
    )
    # See marketplace_server.keyring.
    rotate_signing_key: bool = flag(
        "retire the current signing key (kept, still listed by ListSigningKeys) and sign with a new "
        "one from this start on; the keys live in DATA_DIR, or with PostgreSQL in the database, where "
        "a rotation at one replica reaches all within seconds",
        default=False,
    )
    login_attempts_per_minute: float = flag(
        "failed login attempts allowed per minute per peer; an e-mail with several recent "
        "failures is slowed down (up to 1 s per attempt), never locked",
        name="login-rate",
        default=10.0,
        metavar="N",
        check=positive,
    )
    claim_attempts_per_minute: float = flag(
        "wrong pairing-code attempts allowed per minute per instance and per peer",
        name="claim-rate",
        default=5.0,
        metavar="N",
        check=positive,
    )
    # How long a request_id is remembered (AIP-155); older keys are cleaned up and may be reused.
    idempotency_ttl: float = flag(
        "seconds a request_id is remembered; a retry after that creates anew",
        default=86400.0,
        metavar="SECONDS",
        check=positive,
    )
    max_streams_per_account: int = flag(
        "concurrent long-lived streams (consent, watch) one account may hold",
        default=16,
        metavar="N",
        check=at_least(1),
    )
    # Server-wide cap on RPCs in progress (streams included); past it calls get RESOURCE_EXHAUSTED.
    max_concurrent_rpcs: int = flag(
        "RPCs (streams included) the server runs at once before refusing more with "
        "RESOURCE_EXHAUSTED; 0 = no limit",
        default=20_000,
        metavar="N",
        check=at_least(0),
    )
    grace_period: float = grace_period_flag(
        "seconds in-flight RPCs may finish after SIGTERM/SIGINT", default=10.0
    )
    log_level: str = log_level_flag("log verbosity")
    tls_cert: Path | None = file_flag("PEM certificate chain to serve TLS with")
    tls_key: Path | None = file_flag("PEM private key of --tls-cert")
    tls_client_ca: Path | None = file_flag(
        "PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)"
    )
    aiida_tls_ca: Path | None = file_flag(
        "PEM CA bundle to verify AIIDAs with; when set, AIIDAs are dialled over TLS", name="aiida-ca"
    )
    aiida_client_cert: Path | None = file_flag("PEM client certificate presented to AIIDAs (mutual TLS)")
    aiida_client_key: Path | None = file_flag("PEM private key of --aiida-client-cert")
    ping_interval: float = flag(
        "seconds between liveness pings on each AIIDA stream", default=30.0, metavar="SECONDS", check=positive
    )
    oidc_issuer: str | None = flag(
        "also accept access tokens of this OpenID Connect issuer (keys from its discovery document's "
        "jwks_uri); needs --oidc-audience",
        default=None,
        metavar="URL",
        check=http_url,
    )
    oidc_audience: str | None = flag(
        "the `aud` the external issuer's access tokens must carry (e.g. the marketplace's client id)",
        default=None,
        metavar="AUD",
    )
    oidc_role_claim: str = flag(
        "claim (dotted path, e.g. realm_access.roles) naming the role: customer or eligible_party",
        default="eddie_role",
        metavar="CLAIM",
    )
    metrics_listen: str | None = metrics_listen_flag()
    # Cluster mode (see marketplace_server.cluster): replicas on one PostgreSQL, talking over NATS.
    nats_url: str | None = flag(
        "NATS server (nats://host:port) of a cluster of replicas; needs a PostgreSQL --database-url "
        "(default: one process, no NATS)",
        default=None,
        metavar="URL",
        check=nats_url,
    )
    replica_id: str | None = flag(
        "this replica's id in the cluster (default: generated at start)", default=None, metavar="ID"
    )
    cluster_name: str = flag(
        "NATS subject prefix shared by the replicas of one marketplace",
        default="eddie",
        metavar="NAME",
        check=subject_token,
    )
    event_repair_interval: float = flag(
        "cluster mode: seconds between catching the open consent and watch streams up from the "
        "database (repairs an event whose NATS publish was lost)",
        default=2.0,
        metavar="SECONDS",
        check=positive,
    )
    # Not flags.
    # The TLS listener; built from --tls-cert/--tls-key/--tls-client-ca, or given directly by tests.
    tls: TlsFiles | None = None
    reconnect_max_backoff: float = 30.0
    lease_seconds: float = 6.0  # cluster bucket leases (marketplace_server.cluster.leases)
    renew_seconds: float = 1.0
    key_refresh_seconds: float = 5.0  # re-reading the signing key ring (marketplace_server.keyring)

    def __post_init__(self) -> None:
        if self.tls is None:
            object.__setattr__(self, "tls", TlsFiles.given(self.tls_cert, self.tls_key, self.tls_client_ca))

    def problems(self) -> list[str]:
        """What is wrong with the combination of options (each option is checked on its own first)."""
        problems = []
        if (self.tls_cert is None) != (self.tls_key is None):
            problems.append("--tls-cert and --tls-key must be given together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            problems.append("--tls-client-ca needs --tls-cert and --tls-key")
        if (self.aiida_client_cert is None) != (self.aiida_client_key is None):
            problems.append("--aiida-client-cert and --aiida-client-key must be given together")
        if (self.oidc_issuer is None) != (self.oidc_audience is None):
            problems.append("--oidc-issuer and --oidc-audience must be given together")
        if self.oidc_issuer is not None and self.oidc_issuer == self.issuer:
            problems.append("--oidc-issuer must differ from --issuer (the marketplace's own tokens)")
        if self.search_timeout_default > self.search_timeout_max:
            problems.append(
                f"--search-timeout ({self.search_timeout_default}) exceeds --search-timeout-max "
                f"({self.search_timeout_max})"
            )
        if self.nats_url is not None and not _is_postgresql(self.database_url):
            problems.append("--nats-url (cluster mode) needs a PostgreSQL --database-url")
        if self.replica_id is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.replica_id):
            problems.append("--replica-id must be letters, digits, '-' or '_' (up to 64)")
        return problems

    @property
    def clustered(self) -> bool:
        return self.nats_url is not None

    @property
    def keys_in_database(self) -> bool:
        """The signing key ring lives in the database (PostgreSQL), not in --data-dir: every process on
        one database, clustered or not, signs with the same keys, and needs no persistent data dir."""
        return _is_postgresql(self.database_url)

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'marketplace.db').resolve()}"


def _is_postgresql(url: str | None) -> bool:
    return url is not None and make_url(url).get_backend_name() == "postgresql"


PROGRAM = Program(
    prog="marketplace-server",
    env_prefix="MARKETPLACE",
    description="EDDIE energy-data marketplace: IAM, AIIDA registry, data requests, "
    "fan-out search over AIIDA streams, and consent-based access (gRPC).",
    config=Config,
)


def parse_config(argv: list[str] | None = None) -> Config:
    """Flags, `MARKETPLACE_*` variables, defaults; exits 2 with one line on bad input."""
    return PROGRAM.parse(argv)
