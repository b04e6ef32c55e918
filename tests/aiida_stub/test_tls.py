"""TLS everywhere: the stub serves TLS and dials the marketplace and a grpcs:// sink over TLS."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import grpc

from eddie.aiida.v1 import aiida_pb2, aiida_pb2_grpc
from eddie.framework.v1 import data_sink_pb2_grpc
from eddie.marketplace.v1 import instance_pb2_grpc
from eddie_common import tokens
from tests.support.certs import self_signed_certificate
from tests.support.stub import ISSUER, FakeInstanceService, FakeMarketplace, FakeSink, start_stub, stub_config
from tests.support.stub_messages import configure, data_access


async def test_stub_serves_tls_registers_over_tls_and_streams_to_a_grpcs_sink(tmp_path: Path) -> None:
    cert, key = self_signed_certificate(tmp_path)
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    signing_key = tokens.SigningKey.generate()
    service = FakeInstanceService(signing_key)
    server = grpc.aio.server()
    instance_pb2_grpc.add_InstanceServiceServicer_to_server(service, server)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    marketplace = FakeMarketplace(server, port, service, tokens.TokenIssuer(signing_key, ISSUER))
    sink = FakeSink()
    sink_server = grpc.aio.server()
    data_sink_pb2_grpc.add_DataSinkServiceServicer_to_server(sink, sink_server)
    sink_port = sink_server.add_secure_port("127.0.0.1:0", credentials)
    await sink_server.start()
    config = replace(
        stub_config(tmp_path, marketplace, time_scale=3600.0),
        tls_cert=cert,
        tls_key=key,
        marketplace_ca=cert,
        sink_ca=cert,
    )
    running = await start_stub(config, marketplace)  # registration over TLS succeeded
    try:
        credentials = grpc.ssl_channel_credentials(cert.read_bytes())
        channel = grpc.aio.secure_channel(f"127.0.0.1:{running.port}", credentials)
        stub = aiida_pb2_grpc.AiidaServiceStub(channel)
        sink.tokens["p-tls"] = "sink-token"
        request = configure(data_access("p-tls", f"grpcs://127.0.0.1:{sink_port}"))
        access = await stub.ConfigureDataAccess(request, metadata=marketplace.metadata("aiida-test-1"))
        assert access.state == aiida_pb2.DataAccess.STATE_ACTIVE
        await asyncio.wait_for(sink.arrived.wait(), 10)  # readings arrived over TLS, with --sink-ca
        await channel.close()
    finally:
        await running.close()
        await server.stop(0)
        await sink_server.stop(0)
