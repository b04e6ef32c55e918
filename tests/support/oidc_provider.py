"""A small local OpenID Connect provider for tests: discovery + JWKS over HTTP on port 0, and tokens."""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa


@dataclass
class ProviderKey:
    kid: str
    algorithm: str
    private_key: Any

    def jwk(self) -> dict[str, Any]:
        algorithm = jwt.get_algorithm_by_name(self.algorithm)
        document: dict[str, Any] = json.loads(algorithm.to_jwk(self.private_key.public_key()))
        document.update(kid=self.kid, alg=self.algorithm, use="sig")
        return document

    @classmethod
    def rsa(cls, kid: str = "", algorithm: str = "RS256") -> ProviderKey:
        return cls(kid or uuid.uuid4().hex[:12], algorithm, rsa.generate_private_key(65537, 2048))

    @classmethod
    def ec(cls, kid: str = "") -> ProviderKey:
        return cls(kid or uuid.uuid4().hex[:12], "ES256", ec.generate_private_key(ec.SECP256R1()))


@dataclass
class OidcProvider:
    """Serves `/.well-known/openid-configuration` and `/jwks`; signs tokens with its keys."""

    keys: list[ProviderKey] = field(default_factory=lambda: [ProviderKey.rsa()])
    jwks_fetches: int = 0
    _server: ThreadingHTTPServer | None = None

    @property
    def issuer(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/realms/eddie"

    def start(self) -> OidcProvider:
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.endswith("/.well-known/openid-configuration"):
                    body = {"issuer": provider.issuer, "jwks_uri": provider.issuer + "/jwks"}
                elif self.path.endswith("/jwks"):
                    provider.jwks_fetches += 1
                    body = {"keys": [k.jwk() for k in provider.keys]}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def token(
        self,
        subject: str,
        *,
        audience: str | list[str] = "eddie-marketplace",
        role: Any = "customer",
        key: ProviderKey | None = None,
        headers: dict[str, Any] | None = None,
        algorithm: str | None = None,
        ttl: float = 300,
        **claims: Any,
    ) -> str:
        """An access token like Keycloak's (the role in `eddie_role` unless role is None)."""
        key = key or self.keys[0]
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": self.issuer,
            "sub": subject,
            "aud": audience,
            "iat": now,
            "exp": now + int(ttl),
            "typ": "Bearer",
            "name": f"User {subject}",
            **claims,
        }
        if role is not None:
            payload["eddie_role"] = role
        return jwt.encode(
            payload,
            key.private_key,
            algorithm=algorithm or key.algorithm,
            headers={"kid": key.kid, **(headers or {})},
        )
