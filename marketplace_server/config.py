"""The marketplace's configuration: flags with environment fallbacks."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from eddie_common.cli import EnvArgumentParser
from eddie_common.serving import TlsFiles


@dataclass(frozen=True)
class Config:
    """Everything `create_server` needs; tests build one directly."""

    listen: str = "127.0.0.1:50051"
    data_dir: Path = Path("var/marketplace")
    database_url: str | None = None
    # PostgreSQL only: keep every table in this schema (its search_path); None = the default.
    database_schema: str | None = None
    issuer: str = "eddie-marketplace"
    access_token_ttl: float = 900.0
    refresh_token_ttl: float = 30 * 86400.0
    aiida_token_ttl: float = 300.0
    decision_timeout: float = 7 * 86400.0
    search_timeout_default: float = 3.0
    search_timeout_max: float = 60.0
    search_rate_per_minute: float = 60.0
    login_attempts_per_minute: float = 10.0
    claim_attempts_per_minute: float = 5.0
    # How long a request_id is remembered (AIP-155); older keys are cleaned up and may be reused.
    idempotency_ttl: float = 86400.0
    max_streams_per_account: int = 16
    # Server-wide cap on RPCs in progress (streams included); past it calls get RESOURCE_EXHAUSTED.
    max_concurrent_rpcs: int = 20_000
    grace_period: float = 10.0
    log_level: str = "info"
    tls: TlsFiles | None = None
    aiida_tls_ca: Path | None = None
    aiida_client_cert: Path | None = None
    aiida_client_key: Path | None = None
    reconnect_max_backoff: float = 30.0
    ping_interval: float = 30.0
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'marketplace.db').resolve()}"


def build_parser() -> EnvArgumentParser:
    p = EnvArgumentParser(
        prog="marketplace-server",
        env_prefix="MARKETPLACE",
        description="EDDIE energy-data marketplace: IAM, AIIDA registry, data requests, "
        "fan-out search over AIIDA streams, and consent-based access (gRPC).",
    )
    d = Config()
    p.add_flag("--listen", default=d.listen, help="HOST:PORT to serve gRPC on (port 0 picks a free port)")
    p.add_flag(
        "--data-dir",
        type=Path,
        default=d.data_dir,
        help="directory for the signing key and the default SQLite database",
    )
    p.add_flag(
        "--database-url",
        default=None,
        help="SQLAlchemy async URL, e.g. postgresql+asyncpg://user@host/db (default: SQLite in --data-dir)",
    )
    p.add_flag(
        "--database-schema",
        default=None,
        help="PostgreSQL schema to keep the tables in (must exist; default: the user's search_path)",
    )
    p.add_flag("--issuer", default=d.issuer, help="the `iss` claim of every token the marketplace signs")
    p.add_flag(
        "--access-token-ttl", type=float, default=d.access_token_ttl, help="access token lifetime, seconds"
    )
    p.add_flag(
        "--refresh-token-ttl", type=float, default=d.refresh_token_ttl, help="refresh token lifetime, seconds"
    )
    p.add_flag(
        "--aiida-token-ttl",
        type=float,
        default=d.aiida_token_ttl,
        help="lifetime of the tokens the marketplace presents to AIIDAs, seconds",
    )
    p.add_flag(
        "--decision-timeout",
        type=float,
        default=d.decision_timeout,
        help="how long a customer has to decide on an access request, seconds (default 7 days)",
    )
    p.add_flag(
        "--search-timeout",
        type=float,
        default=d.search_timeout_default,
        help="default time a search waits for AIIDA answers, seconds",
    )
    p.add_flag(
        "--search-timeout-max",
        type=float,
        default=d.search_timeout_max,
        help="largest search timeout a caller may ask for, seconds",
    )
    p.add_flag(
        "--search-rate",
        type=float,
        default=d.search_rate_per_minute,
        help="searches an eligible party may start per minute",
    )
    p.add_flag(
        "--login-rate",
        type=float,
        default=d.login_attempts_per_minute,
        help="failed login attempts allowed per minute per peer; an e-mail with several recent "
        "failures is slowed down (up to 1 s per attempt), never locked",
    )
    p.add_flag(
        "--idempotency-ttl",
        type=float,
        default=d.idempotency_ttl,
        help="seconds a request_id is remembered; a retry after that creates anew",
    )
    p.add_flag(
        "--claim-rate",
        type=float,
        default=d.claim_attempts_per_minute,
        help="wrong pairing-code attempts allowed per minute per instance and per peer",
    )
    p.add_flag(
        "--max-streams-per-account",
        type=int,
        default=d.max_streams_per_account,
        help="concurrent long-lived streams (consent, watch) one account may hold",
    )
    p.add_flag(
        "--max-concurrent-rpcs",
        type=int,
        default=d.max_concurrent_rpcs,
        help="RPCs (streams included) the server runs at once before refusing more with "
        "RESOURCE_EXHAUSTED; 0 = no limit",
    )
    p.add_flag(
        "--grace-period",
        type=float,
        default=d.grace_period,
        help="seconds in-flight RPCs may finish after SIGTERM/SIGINT",
    )
    p.add_flag(
        "--log-level",
        default=d.log_level,
        choices=["debug", "info", "warning", "error"],
        help="log verbosity",
    )
    p.add_flag("--tls-cert", type=Path, default=None, help="PEM certificate chain to serve TLS with")
    p.add_flag("--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    p.add_flag(
        "--tls-client-ca",
        type=Path,
        default=None,
        help="PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)",
    )
    p.add_flag(
        "--aiida-ca",
        type=Path,
        default=None,
        help="PEM CA bundle to verify AIIDAs with; when set, AIIDAs are dialled over TLS",
    )
    p.add_flag(
        "--aiida-client-cert",
        type=Path,
        default=None,
        help="PEM client certificate presented to AIIDAs (mutual TLS)",
    )
    p.add_flag("--aiida-client-key", type=Path, default=None, help="PEM private key of --aiida-client-cert")
    p.add_flag(
        "--ping-interval",
        type=float,
        default=d.ping_interval,
        help="seconds between liveness pings on each AIIDA stream",
    )
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise SystemExit("--tls-cert and --tls-key must be given together")
        tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca)
    return Config(
        listen=args.listen,
        data_dir=args.data_dir,
        database_url=args.database_url,
        database_schema=args.database_schema,
        issuer=args.issuer,
        access_token_ttl=args.access_token_ttl,
        refresh_token_ttl=args.refresh_token_ttl,
        aiida_token_ttl=args.aiida_token_ttl,
        decision_timeout=args.decision_timeout,
        search_timeout_default=args.search_timeout,
        search_timeout_max=args.search_timeout_max,
        search_rate_per_minute=args.search_rate,
        login_attempts_per_minute=args.login_rate,
        claim_attempts_per_minute=args.claim_rate,
        idempotency_ttl=args.idempotency_ttl,
        max_streams_per_account=args.max_streams_per_account,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        grace_period=args.grace_period,
        log_level=args.log_level,
        tls=tls,
        aiida_tls_ca=args.aiida_ca,
        aiida_client_cert=args.aiida_client_cert,
        aiida_client_key=args.aiida_client_key,
        ping_interval=args.ping_interval,
    )
