"""One server interceptor that authenticates each call and maps errors to statuses.

Every handler behaviour is wrapped, so authentication runs inside the RPC's own
task (the caller lands in a context variable the service layer reads), and any
exception leaving a servicer becomes a canonical status with a
`google.rpc.ErrorInfo` detail. Unexpected exceptions become INTERNAL with a
generic message and a logged error id; nothing internal reaches the caller.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar, cast

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from eddie_common.errors import DomainError, InvalidArgument
from eddie_common.logging import log_event

log = logging.getLogger(__name__)

# The authenticated caller of the current RPC; set by the interceptor, read through `caller_as`.
_current_caller: contextvars.ContextVar[object | None] = contextvars.ContextVar(
    "current_caller", default=None
)

# (method, metadata) -> the caller, or raises DomainError (usually Unauthenticated).
Authenticator = Callable[[str, tuple[tuple[str, str | bytes], ...]], Awaitable[object]]
# Maps a non-domain exception (e.g. a database outage) to a DomainError, or None.
Translator = Callable[[BaseException], DomainError | None]

_T = TypeVar("_T")

# Trailers past the client's metadata limit (8 KiB soft, 16 KiB hard by default) would replace the
# error with the client's own RESOURCE_EXHAUSTED, so what an error carries is bounded.
MAX_MESSAGE_CHARS = 1024
MAX_VIOLATIONS = 20
_MAX_FIELD_CHARS = 200


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def error_message(error: DomainError) -> str:
    """The status message, at most MAX_MESSAGE_CHARS characters."""
    return _clip(error.message, MAX_MESSAGE_CHARS)


def rich_status(error: DomainError, domain: str) -> grpc.Status:
    """The status of `error`: its code and message, with ErrorInfo and (the first violations as)
    BadRequest in the `grpc-status-details-bin` trailer that `grpc_status` writes."""
    status = status_pb2.Status(code=error.code.value[0], message=error_message(error))
    info = any_pb2.Any()
    metadata = {_clip(k, _MAX_FIELD_CHARS): _clip(v, _MAX_FIELD_CHARS) for k, v in error.metadata.items()}
    if len(error.violations) > MAX_VIOLATIONS:
        metadata["violation_count"] = str(len(error.violations))
    info.Pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=domain, metadata=metadata))
    status.details.append(info)
    if error.violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=_clip(v.field, _MAX_FIELD_CHARS), description=_clip(v.description, _MAX_FIELD_CHARS)
                )
                for v in error.violations[:MAX_VIOLATIONS]
            ]
        )
        detail = any_pb2.Any()
        detail.Pack(bad)
        status.details.append(detail)
    built: grpc.Status = rpc_status.to_status(status)
    return built


# Health and reflection calls pass through the interceptors untouched.
UNWRAPPED_METHODS = ("/grpc.health.", "/grpc.reflection.")


class WrapOnceInterceptor(grpc.aio.ServerInterceptor):
    """Wraps each method's handler once (`wrap`) and hands every call of it the same wrapper, anew
    only when the server hands over another handler: rewrapping per call is a cost on every RPC and
    every AIIDA stream opened after a restart."""

    def __init__(self) -> None:
        # method -> (the servicer's handler, our wrapper). Only methods the server registered get
        # here (unknown ones have no handler), so the dict stays small.
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    async def intercept_service(  # type: ignore[override]
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None or method.startswith(UNWRAPPED_METHODS):
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self.wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def wrap(self, handler: Any, method: str) -> Any:
        """The handler to serve `method` with instead of `handler`."""
        raise NotImplementedError


class ServiceInterceptor(WrapOnceInterceptor):
    """Authenticates non-public methods and maps exceptions to gRPC statuses."""

    def __init__(
        self,
        *,
        domain: str,
        authenticate: Authenticator | None = None,
        public_methods: frozenset[str] = frozenset(),
        translate: Translator | None = None,
    ) -> None:
        super().__init__()
        self.domain = domain
        self.authenticate = authenticate
        self.public_methods = public_methods
        self.translate = translate

    def wrap(self, handler: Any, method: str) -> Any:
        needs_auth = self.authenticate is not None and method not in self.public_methods
        streaming = handler.request_streaming
        kind = (streaming, handler.response_streaming)
        new: Any
        if kind == (False, False):
            new = grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, method, needs_auth, streaming)
            )
        elif kind == (False, True):
            new = grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, method, needs_auth, streaming)
            )
        elif kind == (True, False):
            new = grpc.stream_unary_rpc_method_handler(
                self._unary(handler.stream_unary, method, needs_auth, streaming)
            )
        else:
            new = grpc.stream_stream_rpc_method_handler(
                self._stream(handler.stream_stream, method, needs_auth, streaming)
            )
        return new._replace(
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    async def _authenticate(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        assert self.authenticate is not None
        caller = await self.authenticate(method, tuple(context.invocation_metadata() or ()))
        _current_caller.set(caller)

    async def _admit(self, request: Any, method: str, needs_auth: bool, streaming: bool, context: Any) -> Any:
        """Authenticates, then refuses a request that did not parse; returns what the servicer gets."""
        if needs_auth:
            await self._authenticate(method, context)
        if streaming:
            return _well_formed(request)
        if request is _MALFORMED:
            raise _malformed_request()
        return request

    def _unary(self, behaviour: Any, method: str, needs_auth: bool, streaming: bool) -> Any:
        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                request = await self._admit(request, method, needs_auth, streaming, context)
                return await behaviour(request, context)
            except Exception as exc:
                await self._abort(context, method, exc)

        return call

    def _stream(self, behaviour: Any, method: str, needs_auth: bool, streaming: bool) -> Any:
        if inspect.iscoroutinefunction(behaviour):
            # The reader/writer form (`context.read()` / `context.write()`, returns None): no
            # async-generator layer per call or per message. Requests read with `context.read()`
            # go through `well_formed`.
            async def respond(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
                try:
                    request = await self._admit(request, method, needs_auth, streaming, context)
                    await behaviour(request, context)
                except Exception as exc:
                    await self._abort(context, method, exc)

            return respond

        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            try:
                request = await self._admit(request, method, needs_auth, streaming, context)
                async for response in behaviour(request, context):
                    yield response
            except Exception as exc:
                await self._abort(context, method, exc)

        return call

    async def _abort(self, context: grpc.aio.ServicerContext[Any, Any], method: str, exc: Exception) -> None:
        if isinstance(exc, asyncio.CancelledError) or type(exc).__name__ == "AbortError":
            raise exc
        error = exc if isinstance(exc, DomainError) else (self.translate(exc) if self.translate else None)
        if error is None:
            error_id = uuid.uuid4().hex[:12]
            log.error("rpc_failed", exc_info=exc, extra={"method": method, "error_id": error_id})
            error = DomainError(f"internal error (error id {error_id})", reason="INTERNAL")
        else:
            log_event(
                log, "rpc_error", logging.DEBUG, method=method, code=error.code.name, reason=error.reason
            )
        status = rich_status(error, self.domain)
        await context.abort(status.code, status.details, trailing_metadata=status.trailing_metadata)


# What a request message that does not parse becomes (instead of grpc's UNKNOWN with the parser's
# exception text); the wrapped handler answers it with INVALID_ARGUMENT and an ErrorInfo.
_MALFORMED = object()


def _malformed_request() -> InvalidArgument:
    return InvalidArgument(
        "the request is not a valid message of this method's request type", reason="MALFORMED_REQUEST"
    )


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # DecodeError, or anything else a parser raises on hostile bytes
            return _MALFORMED

    return deserialize


async def _well_formed(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield well_formed(request)


def well_formed(request: _T) -> _T:
    """A request a reader/writer handler read with `context.read()`: returned if it parsed, else
    INVALID_ARGUMENT (MALFORMED_REQUEST), as for requests read by iterating."""
    if request is _MALFORMED:
        raise _malformed_request()
    return request


def _status_details(rpc_error: grpc.RpcError) -> list[any_pb2.Any]:
    try:
        # Failed calls (sync and aio) carry the code, details and trailers `from_call` reads.
        status: status_pb2.Status | None = rpc_status.from_call(cast(grpc.Call, rpc_error))
    except ValueError:  # a trailer that contradicts the call's own code or message: not ours
        return []
    return list(status.details) if status is not None else []


_Caller = TypeVar("_Caller")


def caller_as(kind: type[_Caller]) -> _Caller | None:
    """The authenticated caller of the current RPC if it is a `kind` (what the program's
    authenticator returns), else None: unauthenticated, or authenticated as something else."""
    caller = _current_caller.get()
    return caller if isinstance(caller, kind) else None


_Detail = TypeVar("_Detail", error_details_pb2.ErrorInfo, error_details_pb2.BadRequest)


def _detail(rpc_error: grpc.RpcError, kind: type[_Detail]) -> _Detail | None:
    """The first status detail of type `kind` of a failed call, if any."""
    for detail in _status_details(rpc_error):
        if detail.Is(kind.DESCRIPTOR):
            message = kind()
            detail.Unpack(message)
            return message
    return None


def error_info(rpc_error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """Extracts the ErrorInfo detail of a failed call (for clients and tests)."""
    return _detail(rpc_error, error_details_pb2.ErrorInfo)


def bad_request(rpc_error: grpc.RpcError) -> error_details_pb2.BadRequest | None:
    """Extracts the BadRequest detail of a failed call, if any."""
    return _detail(rpc_error, error_details_pb2.BadRequest)


__all__ = [
    "Authenticator",
    "ServiceInterceptor",
    "Translator",
    "bad_request",
    "caller_as",
    "error_info",
    "rich_status",
    "well_formed",
]
