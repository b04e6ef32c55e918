"""TLS on both sides: the sink serves TLS and dials a TLS marketplace it trusts via --marketplace-ca."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from eddie.marketplace.v1 import identity_pb2_grpc
from eddie_common import tokens
from eddie_sink.server import create_server
from tests.eddie_sink.conftest import (
    ISSUER,
    FakeMarketplace,
    RunningSink,
    SigningKeysDouble,
    reading,
    sink_config,
)


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 / localhost, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


async def test_sink_serves_tls_and_fetches_keys_over_tls(tmp_path: Path):
    cert, key = self_signed(tmp_path)
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
