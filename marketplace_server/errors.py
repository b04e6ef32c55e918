"""The marketplace's error domain and the mapping of infrastructure failures.

Domain exceptions live in `eddie_common.errors` (one tree for all programs);
this module adds the marketplace's ErrorInfo domain and turns database outages
into UNAVAILABLE so callers retry instead of seeing INTERNAL.
"""

from __future__ import annotations

from sqlalchemy import exc as sa_exc

from eddie_common.errors import (
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Validator,
)

DOMAIN = "marketplace.eddie"


def translate_infrastructure_error(exc: BaseException) -> DomainError | None:
    """Database connectivity problems become UNAVAILABLE (retryable)."""
    if isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError | ConnectionError | TimeoutError):
        return Unavailable("the database is unavailable, retry later", reason="DATABASE_UNAVAILABLE")
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return Unavailable("the database is unavailable, retry later", reason="DATABASE_UNAVAILABLE")
    if isinstance(exc, OSError) and exc.errno is not None:
        return Unavailable("a backing service is unavailable, retry later", reason="BACKEND_UNAVAILABLE")
    name = type(exc).__module__
    if name.startswith("asyncpg") and "Connection" in type(exc).__name__:
        return Unavailable("the database is unavailable, retry later", reason="DATABASE_UNAVAILABLE")
    return None


__all__ = [
    "DOMAIN",
    "AlreadyExists",
    "DomainError",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Validator",
    "translate_infrastructure_error",
]
