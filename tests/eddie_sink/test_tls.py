"""TLS on both sides: the sink serves TLS and dials a TLS marketplace it trusts via --marketplace-ca."""

from __future__ import annotations

from pathlib import Path

import grpc

from eddie.marketplace.v1 import identity_pb2_grpc
from eddie_common import tokens
from eddie_sink.server import create_server
from tests.support.certs import self_signed_certificate
from tests.support.sink import ISSUER, FakeMarketplace, RunningSink, SigningKeysDouble, reading, sink_config


async def test_sink_serves_tls_and_fetches_keys_over_tls(tmp_path: Path):
    cert, key = self_signed_certificate(tmp_path)
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    signing_key = tokens.SigningKey.generate()
    server = grpc.aio.server()
    identity_pb2_grpc.add_IdentityServiceServicer_to_server(SigningKeysDouble([signing_key]), server)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    marketplace = FakeMarketplace(
        server, port, SigningKeysDouble([]), tokens.TokenIssuer(signing_key, ISSUER)
    )
    config = sink_config(
        tmp_path, f"localhost:{port}", tls_cert=cert, tls_key=key, marketplace_ca=cert, listen="localhost:0"
    )
    app, sink_port = await create_server(config)
    channel = grpc.aio.secure_channel(
        f"localhost:{sink_port}", grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    )
    sink = RunningSink(app, config, channel)
    try:
        assert await app.keys.wait_ready(10)
        assert await sink.publish(marketplace.sink_token(), [reading(1)]) == 1
        assert len(await sink.list_all(marketplace.access_token())) == 1
    finally:
        await sink.close()
        await server.stop(0)
