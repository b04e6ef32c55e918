"""The marketplace's start-up checks: files, directories and ports first, then the database.

`preflight` runs before anything is created; `check_database` connects once (PostgreSQL)
before the signing key or any table exists; `explain` turns the database driver's errors into
one line naming the database, the host and the user, never the password, and an unreachable
OpenID Connect issuer into one line naming it.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

from sqlalchemy import text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import create_async_engine

from eddie_common.startup import StartupError, Unavailable, free_port, readable_file, writable_dir
from marketplace_server.config import PROGRAM, Config
from marketplace_server.oidc import OidcDiscoveryError

CONNECT_TIMEOUT = 10.0


def preflight(config: Config) -> None:
    """Every file readable, the data dir writable, the ports free: nothing is created yet."""
    tls = config.tls
    for flag, path in (
        ("--tls-cert", tls.cert if tls else None),
        ("--tls-key", tls.key if tls else None),
        ("--tls-client-ca", tls.client_ca if tls else None),
        ("--aiida-ca", config.aiida_tls_ca),
        ("--aiida-client-cert", config.aiida_client_cert),
        ("--aiida-client-key", config.aiida_client_key),
    ):
        readable_file(flag, path)
    writable_dir("--data-dir", config.data_dir)
    free_port("--listen", config.listen, PROGRAM.prog)
    if config.metrics_listen is not None:
        free_port("--metrics-listen", config.metrics_listen, PROGRAM.prog)


async def check_database(config: Config) -> None:
    """Connects once to a PostgreSQL database (and its schema) so that a failure is said plainly."""
    if not config.database_url or make_url(config.database_url).get_backend_name() != "postgresql":
        return  # SQLite lives in --data-dir, checked by preflight
    engine = create_async_engine(config.database_url, connect_args={"timeout": CONNECT_TIMEOUT})
    try:
        async with engine.connect() as conn:
            if config.database_schema is not None:
                found = await conn.scalar(
                    text("SELECT 1 FROM pg_namespace WHERE nspname = :name"), {"name": config.database_schema}
                )
                if found is None:
                    url = make_url(config.database_url)
                    raise Unavailable(
                        f"--database-schema {config.database_schema}: no such schema in database "
                        f"{url.database} on {_where(url)}",
                        "create it (CREATE SCHEMA) or fix --database-schema",
                    )
    except StartupError:
        raise
    except Exception as exc:
        explained = explain_database_error(exc, config.database_url)
        if explained is None:
            raise
        raise explained from exc
    finally:
        await engine.dispose()


def explain(exc: BaseException, config: Config) -> StartupError | None:
    """One line for a failure of a dependency at start-up: the database or the OIDC issuer."""
    for cause in _causes(exc):
        if isinstance(cause, OidcDiscoveryError):
            return Unavailable(str(cause))
    return explain_database_error(exc, config.database_url)


def explain_database_error(exc: BaseException, database_url: str | None) -> StartupError | None:
    """One line for the database failures an operator can fix; None for anything else."""
    if not database_url:
        return None
    import asyncpg  # only a PostgreSQL URL gets here (~50 ms of import a SQLite start does without)

    url = make_url(database_url)
    shown = url.render_as_string(hide_password=True)
    fix = "fix --database-url"
    for cause in _causes(exc):
        if isinstance(cause, asyncpg.InvalidCatalogNameError):
            return Unavailable(
                f"database {url.database} does not exist on {_where(url)} (--database-url {shown})",
                f"create it or {fix}",
            )
        if isinstance(cause, asyncpg.InvalidAuthorizationSpecificationError | asyncpg.InvalidPasswordError):
            return Unavailable(
                f"PostgreSQL on {_where(url)} refused user {url.username}: {_first_line(cause)} "
                f"(--database-url {shown})",
                "check the user and password in --database-url",
            )
        if isinstance(cause, socket.gaierror):
            return Unavailable(f"cannot resolve the database host {url.host} (--database-url {shown})", fix)
        if isinstance(cause, OSError):  # refused, timed out, unreachable
            return Unavailable(
                f"cannot reach PostgreSQL at {_where(url)}: {_first_line(cause)} (--database-url {shown})",
                f"is it running? {fix}",
            )
    return None


def _where(url: URL) -> str:
    return f"{url.host or 'localhost'}:{url.port or 5432}"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending.extend([getattr(current, "orig", None), current.__cause__, current.__context__])
