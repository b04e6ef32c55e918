"""Assertion helpers for gRPC errors, and test certificates."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from eddie_common.interceptors import bad_request, error_info


async def expect_error(
    call: Awaitable[Any], code: grpc.StatusCode, reason: str | None = None, field: str | None = None
) -> grpc.aio.AioRpcError:
    """Awaits `call`, asserting it fails with `code` (and ErrorInfo `reason`, BadRequest `field`)."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    err = caught.value
    assert err.code() == code, f"expected {code}, got {err.code()}: {err.details()}"
    info = error_info(err)
    assert info is not None, "error has no ErrorInfo detail"
    assert info.domain in ("marketplace.eddie", "aiida.eddie", "framework.eddie")
    if reason is not None:
        assert info.reason == reason, f"expected reason {reason}, got {info.reason}"
    if field is not None:
        bad = bad_request(err)
        assert bad is not None and field in [v.field for v in bad.field_violations], (
            f"no violation for {field}: {bad}"
        )
    assert "Traceback" not in (err.details() or "")
    return err


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate (also its own CA) for localhost / 127.0.0.1, and its key, as PEM files."""
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


async def eventually(
    predicate: Callable[[], Awaitable[Any]], timeout: float, what: str = "condition", step: float = 0.05
) -> Any:
    """Polls the async `predicate` until it returns something truthy, and returns that."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"not reached within {timeout}s: {what}"
        await asyncio.sleep(step)
