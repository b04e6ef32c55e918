"""Builders and a seeded catalogue for the data request tests (SQLite and PostgreSQL)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.duration_pb2 import Duration

from eddie.energy.v1 import energy_pb2
from eddie.marketplace.v1 import data_request_pb2
from eddie_client.client import Session
from tests.support import marketplace
from tests.support.marketplace import RunningMarketplace

DataRequest = data_request_pb2.DataRequest
ELECTRICITY = energy_pb2.ENERGY_TYPE_ELECTRICITY
GAS = energy_pb2.ENERGY_TYPE_NATURAL_GAS
HYDROGEN = energy_pb2.ENERGY_TYPE_HYDROGEN
HEAT = energy_pb2.ENERGY_TYPE_HEAT
REQUEST = DataRequest.KIND_DATA_REQUEST
SERVICE = DataRequest.KIND_DATA_SERVICE
DAY = 86_400


@contextlib.asynccontextmanager
async def serving(tmp: Path) -> AsyncIterator[RunningMarketplace]:
    """A marketplace on SQLite in `tmp`, for module-scoped fixtures (tests that share one server)."""
    running = await marketplace.start_marketplace(marketplace.test_config(tmp))
    try:
        yield running
    finally:
        await running.channel.close()
        await running.app.stop(0.5)


def need(**overrides: Any) -> energy_pb2.DataNeed:
    fields: dict[str, Any] = {
        "energy_type": ELECTRICITY,
        "data_tags": ["1-0:1.8.0", "1-0:2.8.0"],
        "min_granularity": Duration(seconds=60),
        "max_granularity": Duration(seconds=900),
        "history": Duration(seconds=30 * DAY),
        "duration": Duration(seconds=365 * DAY),
        "regions": ["AT"],
    }
    fields.update(overrides)
    return energy_pb2.DataNeed(**fields)


def data_request(**overrides: Any) -> data_request_pb2.DataRequest:
    fields: dict[str, Any] = {
        "kind": REQUEST,
        "title": "Heat pump load study",
        "description": "How heat pumps change household load.",
        "purpose": "Research on grid planning.",
        "policy_uri": "https://example.org/privacy",
        "data_need": need(),
    }
    fields.update(overrides)
    return DataRequest(**fields)


def create(dr: data_request_pb2.DataRequest | None = None, request_id: str = "") -> Any:
    return data_request_pb2.CreateDataRequestRequest(
        data_request=dr if dr is not None else data_request(), request_id=request_id
    )


async def create_as(
    client: Session, dr: data_request_pb2.DataRequest | None = None, request_id: str = ""
) -> Any:
    return await client.data_requests.CreateDataRequest(create(dr, request_id), metadata=client.metadata)


async def list_as(client: Session, **fields: Any) -> data_request_pb2.ListDataRequestsResponse:
    request = data_request_pb2.ListDataRequestsRequest(**fields)
    return await client.data_requests.ListDataRequests(request, metadata=client.metadata)


async def all_pages(client: Session, page_size: int, **filters: Any) -> list[list[str]]:
    """Every page's titles, following next_page_token to the end."""
    pages: list[list[str]] = []
    token = ""
    while True:
        response = await list_as(client, page_size=page_size, page_token=token, **filters)
        pages.append([dr.title for dr in response.data_requests])
        token = response.next_page_token
        if not token:
            return pages
        assert len(pages) < 100, "pagination does not end"


@dataclass(frozen=True)
class Seed:
    title: str
    owner: str  # "wien", "lab" or "grid"
    kind: int = REQUEST
    energy_type: int = ELECTRICITY
    regions: tuple[str, ...] = ()
    description: str = ""
    closed: bool = False


# Created in this order (so listed in reverse). Titles are unique.
SEEDS = [
    Seed("Heat pump study", "wien", regions=("AT",), description="How heat pumps change the load"),
    Seed("Solar export survey", "lab", regions=("AT-9",), description="PV with 100% feed-in"),
    Seed("Gas boiler offer", "wien", SERVICE, GAS, ("DE",), "For boiler_owners only"),
    Seed("Vienna district heat", "grid", REQUEST, HEAT, ("AT-9", "DE-BY")),
    Seed("Electricity anywhere", "lab", description="A global study"),
    Seed("Tyrol hydrogen pilot", "wien", SERVICE, HYDROGEN, ("AT-7",)),
    Seed("Bavarian load profiles", "grid", regions=("DE-BY",)),
    Seed("Lower Austria PV", "wien", regions=("AT-3",), closed=True),
    Seed("Paris flats", "lab", regions=("FR-75",)),
    Seed("Paris suburbs", "lab", regions=("FR-7",), description="Solar roofs"),
    Seed("Energy advisor app", "grid", SERVICE, regions=("AT", "DE")),
    Seed("Heat meters Graz", "wien", REQUEST, HEAT, ("AT-6",)),
    Seed("Old closed study", "lab", regions=("AT-9",), closed=True),
    Seed("Gas anywhere", "grid", REQUEST, GAS),
    Seed("Smart charging service", "wien", SERVICE, regions=("AT-9",), description="EV SOLAR charging"),
    Seed("Hydrogen Bavaria", "grid", REQUEST, HYDROGEN, ("DE-BY",)),
    Seed("Austria wide survey", "lab", regions=("AT",)),
    Seed("Closed heat service", "grid", SERVICE, HEAT, (), closed=True),
    Seed("Balcony solar", "wien", regions=("DE", "AT-9")),
    Seed("Vorarlberg gas", "lab", REQUEST, GAS, ("AT-8",)),
    Seed("Salzburg heat", "grid", REQUEST, HEAT, ("AT-5",)),
    Seed("Berlin tenants", "wien", regions=("DE-BE",), description="Mieterstrom 50_50 model"),
    Seed("Carinthia load", "lab", regions=("AT-2",)),
    Seed("EU wide open data", "grid", regions=("AT", "DE", "FR")),
    Seed("Last electricity study", "wien", regions=("AT-9",)),
]


@dataclass
class Catalogue:
    """The seeded marketplace: clients by owner key, seeds by title, account names by key."""

    clients: dict[str, Session]
    names: dict[str, str] = field(default_factory=dict)  # title -> dataRequests/{id}

    def owner_name(self, key: str) -> str:
        account = self.clients[key].account
        assert account is not None
        return account.name

    def expected(
        self,
        *,
        kind: int = 0,
        energy_type: int = 0,
        region: str = "",
        text: str = "",
        owner: str = "",
        show_closed: bool = False,
    ) -> list[str]:
        """Titles the filters must return, newest first (an independent oracle)."""
        titles = []
        for seed in reversed(SEEDS):
            haystack = f"{seed.title}\n{seed.description}".lower()
            if (
                (show_closed or not seed.closed)
                and kind in (0, seed.kind)
                and energy_type in (0, seed.energy_type)
                and (not owner or self.owner_name(seed.owner) == owner)
                and text.lower() in haystack
                and region_matches(seed.regions, region.upper())
            ):
                titles.append(seed.title)
        return titles


def region_matches(regions: tuple[str, ...], wanted: str) -> bool:
    if not wanted or not regions:
        return True
    if "-" in wanted:
        return wanted in regions or wanted.split("-")[0] in regions
    return any(r == wanted or r.startswith(wanted + "-") for r in regions)


async def seed_catalogue(marketplace: RunningMarketplace) -> Catalogue:
    clients = {
        "wien": await marketplace.eligible_party("Wien Energie"),
        "lab": await marketplace.eligible_party("Energy Research Lab"),
        "grid": await marketplace.eligible_party("Grid Operator"),
    }
    catalogue = Catalogue(clients)
    for seed in SEEDS:
        client = clients[seed.owner]
        dr = data_request(
            kind=seed.kind,
            title=seed.title,
            description=seed.description,
            data_need=need(energy_type=seed.energy_type, regions=list(seed.regions)),
        )
        created = await create_as(client, dr)
        catalogue.names[seed.title] = created.name
        if seed.closed:
            close = data_request_pb2.CloseDataRequestRequest(name=created.name)
            await client.data_requests.CloseDataRequest(close, metadata=client.metadata)
    return catalogue


def chunks(titles: list[str], size: int) -> list[list[str]]:
    return [titles[i : i + size] for i in range(0, len(titles), size)] or [[]]
