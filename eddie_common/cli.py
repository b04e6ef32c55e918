"""HOST:PORT addresses as given on the command line: parsing and checking."""

from __future__ import annotations

import ipaddress
import re

# A DNS name (RFC 1123 labels); a string of digits and dots is meant as an IPv4 address instead.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"(?=.*[A-Za-z-]){_LABEL}(?:\.{_LABEL})*\.?")


def split_host_port(value: str) -> tuple[str, int]:
    """Splits `host:port` (IPv6 as `[::1]:50051`), validating the port."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def check_host_port(value: str) -> None:
    """Raises ValueError unless `value` is HOST:PORT with an IP address or a host name as HOST."""
    host, _ = split_host_port(value)
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address (in {value!r})") from None
        return
    try:
        ipaddress.ip_address(host)  # IPv4, or IPv6 without brackets
        return
    except ValueError:
        pass
    if not _HOST_NAME.fullmatch(host):
        raise ValueError(f"{host!r} is not an IP address or host name (in {value!r})")
