"""Registration at the marketplace (InstanceService.RegisterInstance), at every start.

Transient failures (marketplace down, overloaded) are retried with exponential
backoff and jitter; a rejection (PERMISSION_DENIED: another secret is pinned to
the id; INVALID_ARGUMENT) is final and stops the program.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Iterable

import grpc

from aiida_stub.instance import AiidaInstance
from aiida_stub.trust import trust_for
from eddie.marketplace.v1 import instance_pb2, instance_pb2_grpc
from eddie_common import tokens
from eddie_common.channels import dial
from eddie_common.logging import log_event
from eddie_common.retry import Backoff, retry_log_level

log = logging.getLogger(__name__)

REGISTER_TIMEOUT_SECONDS = 10.0
_FINAL = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT)


class RegistrationRejected(Exception):
    """The marketplace refused the registration for good."""


async def _call_until_answered(
    stub: instance_pb2_grpc.InstanceServiceAsyncStub,
    request: instance_pb2.RegisterInstanceRequest,
    backoff: Backoff,
) -> instance_pb2.RegisterInstanceResponse:
    """RegisterInstance, retried on transient failures; a final rejection raises RegistrationRejected."""
    for attempt in itertools.count(1):
        try:
            return await stub.RegisterInstance(request, timeout=REGISTER_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _FINAL:
                raise RegistrationRejected(
                    f"instance {request.instance_id}: the marketplace rejected the registration "
                    f"({exc.code().name}: {exc.details()})"
                ) from None
            delay = backoff.delay(attempt)
            log_event(
                log,
                "registration_retry",
                retry_log_level(attempt),
                instance=request.instance_id,
                code=exc.code().name,
                attempt=attempt,
                retry_in=round(delay, 2),
            )
        await asyncio.sleep(delay)
    raise AssertionError("unreachable")


async def register_instance(
    stub: instance_pb2_grpc.InstanceServiceAsyncStub,
    instance: AiidaInstance,
    address: str,
    backoff: Backoff,
    *,
    quiet: bool = False,
) -> None:
    """Registers `instance` as reachable at `address`, then trusts the key the marketplace returns."""
    record = instance.record
    request = instance_pb2.RegisterInstanceRequest(
        instance_id=record.instance_id,
        address=address,
        instance_secret=record.instance_secret,
        pairing_code=record.pairing_code,
    )
    response = await _call_until_answered(stub, request, backoff)
    try:
        trust = trust_for(
            response.marketplace_public_key, response.marketplace_issuer or tokens.DEFAULT_ISSUER
        )
    except ValueError:
        raise RegistrationRejected(
            f"instance {record.instance_id}: the marketplace sent an unusable public key"
        ) from None
    instance.accept_registration(trust)
    level = logging.DEBUG if quiet else logging.INFO
    log_event(log, "registered", level, instance=record.instance_id, address=address, issuer=trust.issuer)


async def register_all(
    stub: instance_pb2_grpc.InstanceServiceAsyncStub,
    instances: Iterable[AiidaInstance],
    address: str,
    backoff: Backoff,
    concurrency: int,
) -> None:
    """Registers every instance with at most `concurrency` calls in flight; stops at the first rejection."""
    pending = list(instances)
    todo = iter(pending)
    quiet = len(pending) > 1

    async def worker() -> None:
        for instance in todo:
            await register_instance(stub, instance, address, backoff, quiet=quiet)

    workers = [asyncio.create_task(worker()) for _ in range(min(concurrency, len(pending)))]
    try:
        await asyncio.gather(*workers)
    finally:
        for task in workers:
            task.cancel()
    if quiet:
        log_event(log, "fleet_registered", count=len(pending), address=address)


def marketplace_channel(target: str, ca_file_pem: bytes | None) -> grpc.aio.Channel:
    """The channel to the marketplace: TLS with the given CA, else plaintext."""
    return dial(target, grpc.ssl_channel_credentials(ca_file_pem) if ca_file_pem is not None else None)
