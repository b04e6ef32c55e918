"""PostgreSQL stopped under a running marketplace: UNAVAILABLE with an ErrorInfo reason (not INTERNAL)
within a bounded time, health still answers, and the same process recovers when the database is back."""

from __future__ import annotations

import asyncio
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from eddie.marketplace.v1 import access_pb2, consent_pb2, data_request_pb2, identity_pb2
from tests.support.arena import HONEST, NEED, SINK_URI, arena_config, assert_exact, build_arena, health_of
from tests.support.expect import expect_error
from tests.support.hostile_aiida import HostileAiida, Script
from tests.support.marketplace import PASSWORD, start_marketplace
from tests.support.postgres import POSTGRES_URL, postgres_execute, postgres_reachable

# --- 3. the database goes away under a running marketplace, and comes back ---


def _postgres_cluster() -> tuple[str, str] | None:
    """(version, name) of the local cluster on port 5432, if pg_lsclusters knows one."""
    if shutil.which("pg_lsclusters") is None or shutil.which("pg_ctlcluster") is None:
        return None
    listing = subprocess.run(["pg_lsclusters", "-h"], capture_output=True, text=True, check=False).stdout
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "5432":
            return fields[0], fields[1]
    return None


def _pg_ctl(cluster: tuple[str, str], action: str) -> None:
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", *cluster, action],
        check=True,
        capture_output=True,
        timeout=60,
    )


async def _until_postgres(up: bool, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while postgres_reachable() != up:
        assert time.monotonic() < deadline, f"PostgreSQL never became {'reachable' if up else 'unreachable'}"
        await asyncio.sleep(0.1)


@pytest.mark.slow
@pytest.mark.postgres
async def test_a_database_outage_is_unavailable_and_the_same_process_recovers(tmp_path: Path) -> None:
    cluster = _postgres_cluster()
    if not postgres_reachable() or cluster is None:
        pytest.skip("needs the local PostgreSQL cluster on 127.0.0.1:5432 and pg_ctlcluster to stop it")
    schema = f"t_{secrets.token_hex(8)}"
    try:
        await postgres_execute(f"CREATE SCHEMA {schema}")
    except Exception as exc:
        pytest.skip(f"PostgreSQL at {POSTGRES_URL} is not usable: {type(exc).__name__}: {exc}")
    honest = await HostileAiida({i: Script(m) for i, m in HONEST.items()}).start()
    market = await start_marketplace(
        arena_config(tmp_path, database_url=POSTGRES_URL, database_schema=schema)
    )
    try:
        arena = await build_arena(market.channel, market.address, market.app, honest)
        owner, ep = arena.owner, arena.ep
        assert owner.account is not None

        def calls() -> dict[str, Any]:
            """Calls that each need the database (authentication alone reads the account)."""
            return {
                "CreateToken": owner.identity.CreateToken(
                    identity_pb2.CreateTokenRequest(email=owner.account.email, password=PASSWORD)
                ),
                "GetCurrentAccount": owner.identity.GetCurrentAccount(
                    identity_pb2.GetCurrentAccountRequest(), metadata=owner.metadata
                ),
                "ListDataRequests": ep.data_requests.ListDataRequests(
                    data_request_pb2.ListDataRequestsRequest(), metadata=ep.metadata
                ),
                "CreateDataRequest": ep.data_requests.CreateDataRequest(
                    data_request_pb2.CreateDataRequestRequest(
                        data_request=data_request_pb2.DataRequest(
                            title="Outage", purpose="Test", data_need=NEED
                        )
                    ),
                    metadata=ep.metadata,
                ),
                "SearchInstances": arena.search(timeout=1.0),
            }

        health = health_of(market.channel)
        try:
            await asyncio.to_thread(_pg_ctl, cluster, "stop")
            await _until_postgres(up=False)
            await asyncio.sleep(2.5)  # past the authenticator's account cache
            for name, call in calls().items():
                started = time.monotonic()
                err = await expect_error(call, grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE")
                took = time.monotonic() - started
                assert took < 6.0, f"{name} took {took:.1f}s to say the database is unavailable"
                details = err.details() or ""
                assert "asyncpg" not in details and "sqlalchemy" not in details.lower(), details
            answer = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            await asyncio.to_thread(_pg_ctl, cluster, "start")
        await _until_postgres(up=True)
        # The same process recovers: no restart, the pool replaces its dead connections.
        deadline = time.monotonic() + 20
        while True:
            pending = calls()
            results = await asyncio.gather(*pending.values(), return_exceptions=True)
            failures = {n: r for n, r in zip(pending, results, strict=True) if isinstance(r, BaseException)}
            if not failures:
                break
            assert time.monotonic() < deadline, f"still failing after the database came back: {failures}"
            await asyncio.sleep(0.5)
        # The background workers survived the outage too: an approval reaches the AIIDA.
        matches, summary, _ = await arena.search(timeout=3.0)
        assert_exact(matches, summary, hostile=0)
        [permission] = (
            await ep.access.RequestAccess(
                access_pb2.RequestAccessRequest(
                    data_request=arena.data_request.name, instance_ids=["honest-match-1"], sink_uri=SINK_URI
                ),
                metadata=ep.metadata,
            )
        ).permissions
        await owner.consent.DecideAccess(
            consent_pb2.DecideAccessRequest(permission=permission.name, approve=True), metadata=owner.metadata
        )
        permission_id = permission.name.removeprefix("permissions/")
        await honest.until(lambda: permission_id in honest.configured, 10, "configured after the outage")
    finally:
        if not postgres_reachable() and cluster is not None:
            await asyncio.to_thread(_pg_ctl, cluster, "start")
        await market.channel.close()
        await market.app.stop(0.2)
        await honest.stop()
        await postgres_execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
