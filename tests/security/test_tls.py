"""Transport security: TLS to the marketplace, mutual TLS marketplace -> AIIDA, TLS AIIDA -> sink.

A CA and every certificate are made at test time (`certs.CertificateAuthority`);
server certificates carry 127.0.0.1/localhost SANs, so no target-name override
is needed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc

from eddie.framework.v1 import data_sink_pb2, data_sink_pb2_grpc
from eddie.marketplace.v1 import access_pb2, consent_pb2, data_request_pb2, identity_pb2, instance_pb2
from eddie_client.client import Session
from eddie_common.serving import TlsFiles
from eddie_sink.config import SinkConfig
from eddie_sink.server import create_server as create_sink
from marketplace_server.config import Config
from marketplace_server.server import create_server
from tests.support.certs import CertificateAuthority, KeyPair
from tests.support.fleet import RunningAiida, claim, start_aiida, wait_connected
from tests.support.marketplace import RunningMarketplace, test_config
from tests.support.world import data_need

PROFILE = Path(__file__).resolve().parents[2] / "aiida_stub" / "profiles" / "vienna-p1.toml"


@dataclass
class Pki:
    ca: CertificateAuthority
    marketplace: KeyPair
    aiida: KeyPair
    sink: KeyPair
    marketplace_client: KeyPair  # what the marketplace presents to AIIDAs
    app_client: KeyPair  # a client of a marketplace that asks for client certificates
    stranger: KeyPair  # a client certificate from another CA

    def credentials(self, client: KeyPair | None = None, ca: Path | None = None) -> grpc.ChannelCredentials:
        key, cert = client.read() if client else (None, None)
        return grpc.ssl_channel_credentials((ca or self.ca.cert).read_bytes(), key, cert)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(directory / "ca")
    other = CertificateAuthority(directory / "other", "Other CA")
    return Pki(
        ca,
        ca.issue("marketplace.test", server=True),
        ca.issue("aiida.test", server=True),
        ca.issue("sink.test", server=True),
        ca.issue("marketplace-client.test", client=True),
        ca.issue("customer-app.test", client=True),
        other.issue("intruder.test", client=True),
    )


async def start_tls_marketplace(config: Config, credentials: grpc.ChannelCredentials) -> RunningMarketplace:
    app, port = await create_server(config)
    await app.start()
    return RunningMarketplace(app, port, grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials))


async def stop(market: RunningMarketplace) -> None:
    await market.channel.close()
    await market.app.stop(0)


async def health(channel: grpc.aio.Channel) -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
    return int(response.status)


async def assert_refused(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await health(channel)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
    await channel.close()


async def test_the_marketplace_serves_tls_and_refuses_plaintext_and_untrusting_clients(
    tmp_path: Path, pki: Pki
) -> None:
    tls = TlsFiles(pki.marketplace.cert, pki.marketplace.key)
    market = await start_tls_marketplace(test_config(tmp_path, tls=tls), pki.credentials())
    try:
        customer = await market.customer()  # sign-up and login over TLS
        account = await customer.identity.GetCurrentAccount(
            identity_pb2.GetCurrentAccountRequest(), metadata=customer.metadata
        )
        assert account.role == identity_pb2.ROLE_CUSTOMER
        address = f"127.0.0.1:{market.port}"
        await assert_refused(grpc.aio.insecure_channel(address))
        await assert_refused(grpc.aio.secure_channel(address, pki.credentials(ca=pki.stranger.cert)))
    finally:
        await stop(market)


async def test_a_marketplace_with_a_client_ca_requires_client_certificates(tmp_path: Path, pki: Pki) -> None:
    tls = TlsFiles(pki.marketplace.cert, pki.marketplace.key, client_ca=pki.ca.cert)
    market = await start_tls_marketplace(test_config(tmp_path, tls=tls), pki.credentials(pki.app_client))
    try:
        assert await health(market.channel) == health_pb2.HealthCheckResponse.SERVING
        address = f"127.0.0.1:{market.port}"
        await assert_refused(grpc.aio.secure_channel(address, pki.credentials()))  # no certificate
        await assert_refused(grpc.aio.secure_channel(address, pki.credentials(pki.stranger)))  # other CA
    finally:
        await stop(market)


# --- mutual TLS to the AIIDA, TLS everywhere else ---


@dataclass
class TlsScene:
    market: RunningMarketplace
    aiida: RunningAiida
    customer: Session
    ep: Session


def _aiida_tls(pki: Pki) -> dict[str, Any]:
    """The AIIDA serves mutual TLS and dials the marketplace and grpcs:// sinks trusting the CA."""
    return {
        "tls_cert": pki.aiida.cert,
        "tls_key": pki.aiida.key,
        "tls_client_ca": pki.ca.cert,
        "marketplace_ca": pki.ca.cert,
        "sink_ca": pki.ca.cert,
    }


@pytest.fixture
async def scene(tmp_path: Path, pki: Pki) -> AsyncIterator[TlsScene]:
    config = test_config(
        tmp_path,
        tls=TlsFiles(pki.marketplace.cert, pki.marketplace.key),
        aiida_tls_ca=pki.ca.cert,
        aiida_client_cert=pki.marketplace_client.cert,
        aiida_client_key=pki.marketplace_client.key,
        reconnect_max_backoff=0.5,
    )
    market = await start_tls_marketplace(config, pki.credentials())
    aiida = await start_aiida(market, tmp_path, "tls-aiida-1", PROFILE, time_scale=3600.0, **_aiida_tls(pki))
    customer, ep = await market.customer(), await market.eligible_party()
    yield TlsScene(market, aiida, customer, ep)
    await aiida.app.stop(0)
    await stop(market)


async def _search(ep: Session) -> tuple[str, list[str]]:
    request = data_request_pb2.CreateDataRequestRequest(
        data_request=data_request_pb2.DataRequest(title="TLS study", purpose="p", data_need=data_need())
    )
    dr = await ep.data_requests.CreateDataRequest(request, metadata=ep.metadata)
    search = data_request_pb2.SearchInstancesRequest(data_request=dr.name, timeout=Duration(seconds=3))
    matches = []
    async for response in ep.data_requests.SearchInstances(search, metadata=ep.metadata):
        if response.HasField("matches"):
            matches.extend(response.matches.instance_ids)
    return dr.name, matches


async def test_mutual_tls_to_the_aiida_and_tls_to_the_sink_carry_the_whole_workflow(
    tmp_path: Path, pki: Pki, scene: TlsScene
) -> None:
    market, customer, ep = scene.market, scene.customer, scene.ep
    await claim(customer, scene.aiida)  # the AIIDA registered over TLS (--marketplace-ca)
    await wait_connected(customer, scene.aiida.instance_id)  # the marketplace dialled it over mutual TLS
    name, matches = await _search(ep)
    assert matches == [scene.aiida.instance_id]

    sink_config = SinkConfig(
        marketplace=market.address,
        data_dir=tmp_path / "sink",
        tls_cert=pki.sink.cert,
        tls_key=pki.sink.key,
        marketplace_ca=pki.ca.cert,
        grace_period=0.2,
    )
    sink, sink_port = await create_sink(sink_config)
    try:
        assert await sink.keys.wait_ready(10)  # ListSigningKeys over TLS
        request = access_pb2.RequestAccessRequest(
            data_request=name, instance_ids=matches, sink_uri=f"grpcs://127.0.0.1:{sink_port}"
        )
        permission = (await ep.access.RequestAccess(request, metadata=ep.metadata)).permissions[0]
        decision = consent_pb2.DecideAccessRequest(permission=permission.name, approve=True)
        await customer.consent.DecideAccess(decision, metadata=customer.metadata)
        async with grpc.aio.secure_channel(f"127.0.0.1:{sink_port}", pki.credentials()) as channel:
            readings = await _readings_arrive(channel, permission.name.removeprefix("permissions/"), ep.token)
        assert readings and all(
            r.permission_id == permission.name.removeprefix("permissions/") for r in readings
        )
    finally:
        await sink.stop(0)


async def _readings_arrive(channel: grpc.aio.Channel, permission_id: str, token: str) -> list[Any]:
    stub = data_sink_pb2_grpc.DataSinkServiceStub(channel)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        call = stub.ListReadings(
            data_sink_pb2.ListReadingsRequest(permission_id=permission_id),
            metadata=(("authorization", f"Bearer {token}"),),
        )
        if await call.code() == grpc.StatusCode.OK and (listed := await call).readings:
            return list(listed.readings)
        await asyncio.sleep(0.1)  # NOT_FOUND until the AIIDA's first Publish stream opened
    raise AssertionError("no reading reached the sink over TLS")


@pytest.mark.parametrize("presented", ["no client certificate", "a certificate of another CA"])
async def test_a_marketplace_without_a_trusted_client_certificate_cannot_reach_an_mtls_aiida(
    tmp_path: Path, pki: Pki, presented: str
) -> None:
    client = pki.stranger if presented == "a certificate of another CA" else None
    config = test_config(
        tmp_path,
        tls=TlsFiles(pki.marketplace.cert, pki.marketplace.key),
        aiida_tls_ca=pki.ca.cert,
        aiida_client_cert=client.cert if client else None,
        aiida_client_key=client.key if client else None,
        reconnect_max_backoff=0.2,
    )
    market = await start_tls_marketplace(config, pki.credentials())
    aiida = await start_aiida(market, tmp_path, "mtls-only-1", PROFILE, **_aiida_tls(pki))
    try:
        customer = await market.customer()
        await claim(customer, aiida)
        manager = market.app.components["manager"]
        link = manager.links[aiida.instance_id]
        await asyncio.sleep(0.8)  # about four reconnect attempts (backoff 0.2 s)
        assert not manager.is_connected(aiida.instance_id) and not link.connected
        instance = await customer.instances.GetInstance(
            instance_pb2.GetInstanceRequest(name=f"instances/{aiida.instance_id}"), metadata=customer.metadata
        )
        assert instance.state == instance_pb2.Instance.STATE_CLAIMED and not instance.connected
    finally:
        await aiida.app.stop(0)
        await stop(market)
