"""A deterministic simulated household meter.

Each energy flow (electricity import, PV export, gas, heat, hydrogen) is one
energy function `E(t)` in kWh: a daily total (seasonal, weekday and weather
variation) spread over the day by a load shape (base load, morning and evening
peaks; a midday bell for PV export) with per-minute noise and a zero-mean
sub-minute wiggle. Everything derives from (seed, flow, time) through a hash, so
the same profile produces the same values in every run and process.

- Cumulative registers (OBIS `x.8.x`, gas/heat indices) read
  `offset + E(t) - E(available_since)`: monotonic.
- Instantaneous quantities (OBIS `x.7.x`, `x.4.x`, `x.5.x`) are the mean power
  over an interval, `(E(b) - E(a)) / (b - a)`.

Because both come from the same `E`, aggregating native readings up to a
coarser granularity (cumulative: the value at the interval end; power: the mean
of the native means) equals evaluating the coarse interval directly, which is
what `readings` does.
"""

from __future__ import annotations

import functools
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from aiida_stub.profile import Source, to_micros
from eddie.energy.v1 import energy_pb2

_MICROS = 1_000_000
DAY_S = 86_400
LOCAL_OFFSET_S = 3_600  # load shapes follow Central European (standard) time
ANCHOR_DAY = 16_436  # 2015-01-01; the energy functions start there (earlier times read as the anchor)
_OBIS = re.compile(r"(\d+)-(\d+):(\d+)\.(\d+)\.(\d+)")
_MASK = (1 << 64) - 1
_DAY_TABLES_KEPT = 32
_WIGGLE = 0.3  # amplitude of the sub-minute power variation (relative)
_KWH_PER_M3: dict[int, float] = {energy_pb2.ENERGY_TYPE_HYDROGEN: 3.0}  # natural gas and anything else: 10.55
_HEATING_DAILY_KWH: dict[int, float] = {  # hydrogen and anything else: 15
    energy_pb2.ENERGY_TYPE_NATURAL_GAS: 38.0,
    energy_pb2.ENERGY_TYPE_HEAT: 32.0,
}
_KWH_PER_KG = 33.3  # hydrogen's lower heating value
_ENERGY_UNITS = {"kWh": 1.0, "Wh": 1e3, "MWh": 1e-3, "MJ": 3.6, "GJ": 3.6e-3, "J": 3.6e6}
_POWER_UNITS = {"W": 1.0, "kW": 1e-3, "MW": 1e-6}


@dataclass(frozen=True)
class TagKind:
    """How a data tag reads: a cumulative register or a mean power, of import or export."""

    cumulative: bool
    export: bool


@functools.lru_cache(maxsize=1024)
def tag_kind(tag: str) -> TagKind:
    """Classifies an OBIS code; anything else reads as an import register."""
    match = _OBIS.fullmatch(tag.split("*")[0].split("&")[0])
    if match is None:
        return TagKind(cumulative=True, export=False)
    _, _, quantity, kind, _ = (int(g) for g in match.groups())
    return TagKind(cumulative=kind not in (4, 5, 7), export=quantity == 2)


@dataclass(frozen=True)
class MeterReading:
    """One value of one tag at the end (`time_us`) of its interval."""

    tag: str
    unit: str
    value: float
    time_us: int


def _fmix(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def _hash(*parts: int) -> int:
    h = 0x9E3779B97F4A7C15
    for part in parts:
        h = _fmix((h + (part & _MASK) + 0x9E3779B97F4A7C15) & _MASK)
    return h


def _unit(*parts: int) -> float:
    """A uniform number in [0, 1) determined by `parts`."""
    return _hash(*parts) / 2.0**64


def _bell(hour: float, centre: float, width: float) -> float:
    return math.exp(-0.5 * ((hour - centre) / width) ** 2)


def _household_shape(hour: float) -> float:
    return 0.45 + 0.9 * _bell(hour, 7.3, 0.9) + 0.35 * _bell(hour, 12.5, 1.3) + 1.5 * _bell(hour, 19.5, 1.7)


def _pv_shape(hour: float) -> float:
    return math.sin(math.pi * (hour - 6.0) / 12.0) ** 1.5 if 6.0 < hour < 18.0 else 0.0


def _heating_shape(hour: float) -> float:
    return 0.35 + 1.0 * _bell(hour, 6.5, 1.2) + 0.7 * _bell(hour, 18.5, 2.2)


@dataclass(frozen=True)
class _FlowModel:
    daily_kwh: float
    shape: Callable[[float], float]
    season_peak_day: int  # day of year with the highest daily total
    season_amplitude: float
    day_noise: float  # relative weather / behaviour variation of the daily total
    minute_noise: float


def _flow_model(energy_type: int, export: bool, with_pv: bool) -> _FlowModel:
    if export:
        return _FlowModel(9.0, _pv_shape, 172, 0.65, 0.6, 0.35)
    if energy_type == energy_pb2.ENERGY_TYPE_ELECTRICITY:
        if with_pv:  # self-consumption flattens the midday import
            return _FlowModel(
                6.5, lambda h: _household_shape(h) * (1 - 0.7 * _pv_shape(h)), 15, 0.2, 0.15, 0.3
            )
        return _FlowModel(9.5, _household_shape, 15, 0.15, 0.15, 0.3)
    return _FlowModel(_HEATING_DAILY_KWH.get(energy_type, 15.0), _heating_shape, 15, 0.75, 0.2, 0.2)


class _Flow:
    """The energy function `E(t)` (kWh since the anchor) of one flow of one household."""

    def __init__(self, seed: int, energy_type: int, export: bool, with_pv: bool) -> None:
        self.key = _hash(seed, energy_type, int(export))
        model = _flow_model(energy_type, export, with_pv)
        self.model = model
        self.daily_kwh = model.daily_kwh * (0.7 + 0.6 * _unit(self.key, 1))
        self.weights = [model.shape((m + 0.5) / 60.0) for m in range(1440)]
        self.prefix = [0.0]  # kWh at the start of day ANCHOR_DAY + i
        self.tables: OrderedDict[int, list[float]] = OrderedDict()

    def day_total(self, day: int) -> float:
        m = self.model
        season = 1 + m.season_amplitude * math.cos(2 * math.pi * (day % 365.25 - m.season_peak_day) / 365.25)
        weekend = 1.1 if (day + 3) % 7 >= 5 and m.shape is not _pv_shape else 1.0
        weather = 1 + m.day_noise * (2 * _unit(self.key, 2, day) - 1)
        return self.daily_kwh * season * weekend * weather

    def energy_before(self, day: int) -> float:
        index = day - ANCHOR_DAY
        while len(self.prefix) <= index:
            self.prefix.append(self.prefix[-1] + self.day_total(ANCHOR_DAY + len(self.prefix) - 1))
        return self.prefix[index]

    def day_table(self, day: int) -> list[float]:
        """Cumulative kWh at each minute boundary of `day` (1441 values)."""
        table = self.tables.get(day)
        if table is None:
            noise = self.model.minute_noise
            cumulative = [0.0]
            for minute, weight in enumerate(self.weights):
                cumulative.append(
                    cumulative[-1] + weight * (1 + noise * (2 * _unit(self.key, 3, day, minute) - 1))
                )
            scale = self.day_total(day) / cumulative[-1]
            table = self.tables[day] = [c * scale for c in cumulative]
            if len(self.tables) > _DAY_TABLES_KEPT:
                self.tables.popitem(last=False)
        return table

    def energy_at(self, t_s: float) -> float:
        """kWh delivered between the anchor and `t_s` (POSIX seconds)."""
        local = max(0.0, t_s + LOCAL_OFFSET_S - ANCHOR_DAY * DAY_S)
        day_offset, second = divmod(local, DAY_S)
        day = ANCHOR_DAY + int(day_offset)
        minute = min(int(second // 60), 1439)
        tau = second - minute * 60
        table = self.day_table(day)
        per_second = (table[minute + 1] - table[minute]) / 60.0
        h = _hash(self.key, 4, day, minute)
        k, phase = 1 + h % 5, 2 * math.pi * ((h >> 8) / 2.0**56)
        omega = 2 * math.pi * k / 60.0
        wiggle = _WIGGLE / omega * (math.cos(phase) - math.cos(omega * tau + phase))
        return self.energy_before(day) + table[minute] + per_second * (tau + wiggle)


def _energy_factor(unit: str, energy_type: int) -> float:
    if unit in _ENERGY_UNITS:
        return _ENERGY_UNITS[unit]
    if unit in ("m3", "Nm3"):
        return 1.0 / _KWH_PER_M3.get(energy_type, 10.55)
    if unit == "kg":
        return 1.0 / _KWH_PER_KG
    return 1.0  # unknown units read in kWh


def _power_factor(unit: str, energy_type: int) -> float:
    """Multiplier from W to `unit` (flow rates such as m3/h included)."""
    if unit in _POWER_UNITS:
        return _POWER_UNITS[unit]
    if unit.endswith("/h"):
        return _energy_factor(unit[:-2], energy_type) / 1000.0
    return 1.0  # unknown units read in W


class Meter:
    """The simulated meters of one household (one profile seed)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._flows: dict[tuple[int, bool, bool], _Flow] = {}
        self._source_flows: dict[tuple[Source, bool], _Flow] = {}
        self._register_base: dict[tuple[Source, bool], float] = {}

    def _flow(self, source: Source, export: bool) -> _Flow:
        flow = self._source_flows.get((source, export))
        if flow is None:
            with_pv = any(tag_kind(t).export for t in source.data_tags)
            key = (source.energy_type, export, with_pv)
            flow = self._flows.get(key) or _Flow(self.seed, source.energy_type, export, with_pv)
            self._flows[key] = self._source_flows[(source, export)] = flow
        return flow

    def register(self, source: Source, tag: str, t_us: int) -> float:
        """The cumulative register of `tag` at `t_us`, in the tag's unit."""
        export = tag_kind(tag).export
        flow = self._flow(source, export)
        base = self._register_base.get((source, export))
        if base is None:  # the register's value when the meter was installed, minus E(install)
            since_s = to_micros(source.available_since) / _MICROS
            base = 1000.0 * (1 + 9 * _unit(flow.key, 5)) - flow.energy_at(since_s)
            self._register_base[(source, export)] = base
        kwh = base + flow.energy_at(t_us / _MICROS)
        return kwh * _energy_factor(source.data_tags[tag], source.energy_type)

    def mean_power(self, source: Source, tag: str, start_us: int, end_us: int) -> float:
        """The mean power of `tag`'s flow over [start_us, end_us), in the tag's unit."""
        flow = self._flow(source, tag_kind(tag).export)
        kwh = flow.energy_at(end_us / _MICROS) - flow.energy_at(start_us / _MICROS)
        watts = kwh * 3.6e12 / (end_us - start_us)  # kWh -> J, per second
        return watts * _power_factor(source.data_tags[tag], source.energy_type)

    def value(self, source: Source, tag: str, start_us: int, end_us: int) -> float:
        """The reading of `tag` for the interval [start_us, end_us)."""
        if tag_kind(tag).cumulative:
            return self.register(source, tag, end_us)
        return self.mean_power(source, tag, start_us, end_us)

    def opening_readings(self, source: Source, tags: Iterable[str], at_us: int) -> list[MeterReading]:
        """The cumulative registers among `tags` at `at_us`: the baseline of an access's first interval."""
        return [
            MeterReading(tag, source.data_tags[tag], self.register(source, tag, at_us), at_us)
            for tag in tags
            if tag_kind(tag).cumulative
        ]

    def readings(
        self, source: Source, tags: Iterable[str], start_us: int, end_us: int, granularity_us: int
    ) -> Iterator[MeterReading]:
        """Readings of `tags` for consecutive intervals of `granularity_us` covering [start_us, end_us).

        A last, shorter interval ends exactly at `end_us`. Readings come in time
        order, tags in the given order within one time.
        """
        tags = list(tags)
        t = start_us
        while t < end_us:
            stop = min(t + granularity_us, end_us)
            for tag in tags:
                yield MeterReading(tag, source.data_tags[tag], self.value(source, tag, t, stop), stop)
            t = stop


@functools.lru_cache(maxsize=256)
def meter_for(seed: int) -> Meter:
    """The shared meter of a seed (fleet instances with one profile share it)."""
    return Meter(seed)
