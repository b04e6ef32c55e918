"""The sink under churn (issue 15.7): many AIIDA Publish streams reconnecting while EPs list readings.

The sink runs as its own process (as in production), trusting a stand-in
marketplace in this process that serves only `ListSigningKeys`. `streams`
publishers, one permission each, loop for `seconds`: open a Publish stream,
wait until the sink accepts it (its initial metadata: the token checked and the
handler running), write one reading every `INTERVAL_S` for a random 2-5 s,
close and wait for the acknowledgement, and reconnect at once. Meanwhile
`listers` EP clients call ListReadings on random permissions without pause. At
the end every permission's listing must hold exactly the readings that were
acknowledged (each stored once), and no stream may have waited more than 1 s to
be accepted. The generator's own event-loop lag is reported too: if it is large,
the latencies include the generator's delay, not only the sink's.

The same load first runs against a floor: a bare grpc.aio DataSinkService in
its own process that only counts messages (no token check, no database), so
the sink's figures can be read against what grpc.aio on this machine, under
its current load, does at best.

    python -m bench.sink_churn [--streams 1000] [--seconds 30] [--listers 8] [--no-floor]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from eddie.energy.v1 import energy_pb2
from eddie.framework.v1 import data_sink_pb2, data_sink_pb2_grpc
from eddie.marketplace.v1 import identity_pb2, identity_pb2_grpc
from eddie_client import procs
from eddie_common import tokens

ISSUER = "bench-marketplace"
EP = "accounts/ep-bench"
INTERVAL_S = 1.0
SESSION_S = (2.0, 5.0)
ACCEPT_LIMIT_S = 1.0
BASE_SECONDS = 1_700_000_000


class _FloorSink(data_sink_pb2_grpc.DataSinkServiceServicer):
    """The floor: accepts every stream at once and counts its messages; lists nothing."""

    async def Publish(self, request_iterator: Any, context: Any) -> data_sink_pb2.PublishResponse:
        await context.send_initial_metadata(())
        accepted = 0
        async for _ in request_iterator:
            accepted += 1
        return data_sink_pb2.PublishResponse(accepted=accepted)

    async def ListReadings(self, request: Any, context: Any) -> data_sink_pb2.ListReadingsResponse:
        return data_sink_pb2.ListReadingsResponse()


async def _serve_floor() -> None:
    server = grpc.aio.server()
    data_sink_pb2_grpc.add_DataSinkServiceServicer_to_server(_FloorSink(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


class _Keys(identity_pb2_grpc.IdentityServiceServicer):
    def __init__(self, key: tokens.SigningKey) -> None:
        self.key = key

    async def ListSigningKeys(self, request: Any, context: Any) -> identity_pb2.ListSigningKeysResponse:
        key = identity_pb2.SigningKey(
            key_id=self.key.key_id, algorithm="ES256", public_key_pem=self.key.public_pem
        )
        return identity_pb2.ListSigningKeysResponse(signing_keys=[key], issuer=ISSUER)


@dataclass
class Figures:
    accept_s: list[float] = field(default_factory=list)
    ack_s: list[float] = field(default_factory=list)
    list_s: list[float] = field(default_factory=list)
    loop_lag_s: list[float] = field(default_factory=list)
    sessions: int = 0
    failed_sessions: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    acked: dict[str, int] = field(default_factory=dict)  # permission -> readings acknowledged

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _reading(permission_id: str, n: int) -> data_sink_pb2.PublishRequest:
    return data_sink_pb2.PublishRequest(
        reading=energy_pb2.Reading(
            permission_id=permission_id,
            data_tag="1-0:1.8.0",
            value=float(n),
            unit="kWh",
            time=timestamp_pb2.Timestamp(seconds=BASE_SECONDS + n),
        )
    )


async def _publisher(
    stub: data_sink_pb2_grpc.DataSinkServiceAsyncStub,
    permission_id: str,
    token: str,
    until: float,
    figures: Figures,
) -> None:
    metadata = (("authorization", f"Bearer {token}"),)
    sent = acked = 0
    await asyncio.sleep(random.uniform(0, INTERVAL_S))  # spread the first connects
    while time.monotonic() < until:
        figures.sessions += 1
        opened = time.monotonic()
        call = stub.Publish(metadata=metadata, timeout=60)
        try:
            # As the AIIDA does: the stream opens with the readings that are due.
            end = opened + random.uniform(*SESSION_S)
            first = sent
            await call.write(_reading(permission_id, sent))
            sent += 1
            await asyncio.wait_for(call.initial_metadata(), 30)
            figures.accept_s.append(time.monotonic() - opened)
            while time.monotonic() + INTERVAL_S <= end:
                await asyncio.sleep(INTERVAL_S)
                await call.write(_reading(permission_id, sent))
                sent += 1
            closing = time.monotonic()
            await call.done_writing()
            response = await call
            figures.ack_s.append(time.monotonic() - closing)
            if response.accepted != sent - first:
                figures.error("accepted count differs from readings written")
            acked = sent
        except (grpc.aio.AioRpcError, TimeoutError) as exc:
            figures.failed_sessions += 1
            figures.error(exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else "accept timeout")
            call.cancel()
            sent = acked  # resend what was not acknowledged (at-least-once, as the AIIDA does)
    figures.acked[permission_id] = acked


async def _lister(
    stub: data_sink_pb2_grpc.DataSinkServiceAsyncStub,
    permissions: list[str],
    token: str,
    until: float,
    figures: Figures,
) -> None:
    metadata = (("authorization", f"Bearer {token}"),)
    while time.monotonic() < until:
        request = data_sink_pb2.ListReadingsRequest(permission_id=random.choice(permissions), page_size=100)
        started = time.monotonic()
        try:
            await stub.ListReadings(request, metadata=metadata, timeout=30)
            figures.list_s.append(time.monotonic() - started)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:  # a permission whose first stream is not in yet
                figures.error(f"ListReadings {exc.code().name}")


async def _loop_lag(until: float, figures: Figures) -> None:
    while time.monotonic() < until:
        before = time.monotonic()
        await asyncio.sleep(0.1)
        figures.loop_lag_s.append(time.monotonic() - before - 0.1)


async def _count_stored(
    stub: data_sink_pb2_grpc.DataSinkServiceAsyncStub, permission_id: str, token: str
) -> int:
    metadata = (("authorization", f"Bearer {token}"),)
    total, page_token = 0, ""
    times: set[int] = set()
    while True:
        request = data_sink_pb2.ListReadingsRequest(
            permission_id=permission_id, page_size=1000, page_token=page_token
        )
        response = await stub.ListReadings(request, metadata=metadata, timeout=30)
        total += len(response.readings)
        times.update(r.time.seconds for r in response.readings)
        page_token = response.next_page_token
        if not page_token:
            break
    return total if len(times) == total else -1  # -1: a reading listed twice


async def _drive(
    address: str,
    issuer: tokens.TokenIssuer,
    streams: int,
    seconds: float,
    listers: int,
    *,
    check: bool = True,
) -> Figures:
    figures = Figures()
    permissions = [f"churn-{i:05d}" for i in range(streams)]
    sink_tokens = {
        p: issuer.issue(
            f"permissions/{p}",
            tokens.AUDIENCE_SINK,
            3600,
            permission_id=p,
            eligible_party=EP,
            instance_id=f"a-{p}",
        )[0]
        for p in permissions
    }
    ep_token = issuer.issue(EP, tokens.AUDIENCE_MARKETPLACE, 3600, role="ROLE_ELIGIBLE_PARTY")[0]
    channel = grpc.aio.insecure_channel(address)
    stub = data_sink_pb2_grpc.DataSinkServiceStub(channel)
    until = time.monotonic() + seconds
    tasks = [_publisher(stub, p, sink_tokens[p], until, figures) for p in permissions]
    tasks += [_lister(stub, permissions, ep_token, until, figures) for _ in range(listers)]
    await asyncio.gather(*tasks, _loop_lag(until, figures))
    mismatched = 0
    for p in permissions if check else ():
        stored = await _count_stored(stub, p, ep_token) if figures.acked.get(p) else 0
        if stored != figures.acked.get(p, 0):
            mismatched += 1
    if mismatched:
        figures.errors["permissions whose stored readings differ from the acknowledged"] = mismatched
    await channel.close()
    return figures


async def _run(work: Path, streams: int, seconds: float, listers: int, floor: bool) -> dict[str, Any]:
    key = tokens.SigningKey.generate()
    issuer = tokens.TokenIssuer(key, ISSUER)
    floor_figures = None
    if floor:
        floor_proc = procs.start("churn-floor", ["bench.sink_churn", "--serve-floor"], work)
        try:
            floor_figures = await _drive(floor_proc.address, issuer, streams, seconds, listers, check=False)
        finally:
            floor_proc.stop()
    server = grpc.aio.server()
    # Only ListSigningKeys is served; the other methods answer UNIMPLEMENTED (the generated base).
    identity_pb2_grpc.add_IdentityServiceServicer_to_server(_Keys(key), server)  # type: ignore[abstract]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    sink = procs.start_sink(f"127.0.0.1:{port}", work / "sink", work, name="churn-sink")
    try:
        figures = await _drive(sink.address, issuer, streams, seconds, listers)
    finally:
        sink.stop()
        await server.stop(0)
    result = summary(figures, streams, seconds, listers)
    if floor_figures is not None:
        result["floor"] = summary(floor_figures, streams, seconds, listers)
    return result


def summary(figures: Figures, streams: int, seconds: float, listers: int) -> dict[str, Any]:
    def ms(values: list[float]) -> dict[str, float]:
        return {
            "p50_ms": round(_pct(values, 0.5) * 1000, 1),
            "p95_ms": round(_pct(values, 0.95) * 1000, 1),
            "p99_ms": round(_pct(values, 0.99) * 1000, 1),
            "max_ms": round(max(values, default=0.0) * 1000, 1),
        }

    return {
        "streams": streams,
        "seconds": seconds,
        "listers": listers,
        "sessions": figures.sessions,
        "failed_sessions": figures.failed_sessions,
        "readings_acked": sum(figures.acked.values()),
        "accept": ms(figures.accept_s),
        "accepted_over_1s": sum(1 for s in figures.accept_s if s > ACCEPT_LIMIT_S),
        "ack": ms(figures.ack_s),
        "list_readings": {**ms(figures.list_s), "calls": len(figures.list_s)},
        "generator_loop_lag": ms(figures.loop_lag_s),
        "mean_accept_ms": round(statistics.fmean(figures.accept_s) * 1000, 1) if figures.accept_s else 0.0,
        "errors": figures.errors,
    }


def run(
    work: Path, streams: int = 1000, seconds: float = 30.0, listers: int = 8, *, floor: bool = True
) -> dict[str, Any]:
    """Runs the soak against the floor, then a sink process in `work`; returns the figures."""
    work.mkdir(parents=True, exist_ok=True)
    return asyncio.run(_run(work, streams, seconds, listers, floor))


def print_figures(f: dict[str, Any]) -> None:
    print(
        f"\nSink under churn: {f['streams']:,} publish streams reconnecting every 2-5 s, "
        f"{f['listers']} EP listers, {f['seconds']:.0f} s"
    )
    rows = [
        ("stream sessions (failed)", f"{f['sessions']:,} ({f['failed_sessions']})"),
        ("readings acknowledged", f"{f['readings_acked']:,}"),
        (
            "accept wait p50 / p95 / p99 / max ms",
            "{p50_ms} / {p95_ms} / {p99_ms} / {max_ms}".format(**f["accept"]),
        ),
        ("streams waiting > 1 s to be accepted", str(f["accepted_over_1s"])),
        ("close -> acknowledgement p50 / p95 / max ms", "{p50_ms} / {p95_ms} / {max_ms}".format(**f["ack"])),
        ("ListReadings calls", f"{f['list_readings']['calls']:,}"),
        ("ListReadings p50 / p95 / max ms", "{p50_ms} / {p95_ms} / {max_ms}".format(**f["list_readings"])),
        (
            "generator loop lag p50 / p99 / max ms",
            "{p50_ms} / {p99_ms} / {max_ms}".format(**f["generator_loop_lag"]),
        ),
        ("errors", json.dumps(f["errors"]) if f["errors"] else "none"),
    ]
    floor = f.get("floor")
    if floor is not None:
        accept = "{p50_ms} / {p95_ms} / {max_ms}".format(**floor["accept"])
        rows.insert(3, ("  floor (bare grpc.aio): accept p50 / p95 / max", accept))
        rows.insert(4, ("  floor: streams waiting > 1 s", str(floor["accepted_over_1s"])))
    for label, value in rows:
        print(f"  {label:<50}{value:>28}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--listers", type=int, default=8)
    parser.add_argument("--no-floor", action="store_true", help="skip the bare grpc.aio floor run")
    parser.add_argument("--serve-floor", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_floor:
        asyncio.run(_serve_floor())
        return
    with tempfile.TemporaryDirectory(prefix="eddie-churn-") as tmp:
        figures = run(Path(tmp), args.streams, args.seconds, args.listers, floor=not args.no_floor)
    print_figures(figures)


if __name__ == "__main__":
    main()
