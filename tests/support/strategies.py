"""Hypothesis strategies that build hostile request messages from their descriptors.

`messages(cls, hints)` walks `cls.DESCRIPTOR.fields` and, for every field, mixes
boundary and hostile values of its type (huge and control-character strings,
injection-looking text, int32/int64 extremes, unknown enum numbers, Durations
and Timestamps out of range or with mismatched signs, repeated fields with up
to thousands of items) with plausible values from `hints`, so examples get past
the first validation check and reach the service code behind it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf import duration_pb2, message_factory, timestamp_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from eddie_common.serving import MAX_MESSAGE_BYTES

Strategy = st.SearchStrategy[Any]
# field name -> strategy of plausible values (strings for string fields, ints for ints, ...)
Hints = Mapping[str, Strategy]

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
UINT32 = (0, 2**32 - 1)
UINT64 = (0, 2**64 - 1)
DURATION_LIMIT = 315_576_000_000  # google.protobuf.Duration's documented range, in seconds
# Requests are kept under the server's receive limit; oversized ones are tested on their own.
MAX_REQUEST_BYTES = MAX_MESSAGE_BYTES - 64 * 1024

HOSTILE_STRINGS = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\n",
    "\r\n",
    "line\nbreak",
    "\t",
    "\x1b[2J",
    "\x7f",
    "\u202e",  # right-to-left override
    "\u200b",  # zero-width space
    "\ufeff",
    "\u2028",
    "\U000e0041",  # a tag character
    "../../../../etc/passwd",
    "..\\..\\windows\\system32",
    "' OR 1=1 --",
    '" OR ""="',
    "'; DROP TABLE accounts; --",
    "%",
    "_",
    "%_%",
    "\\",
    "%s%s%s%n",
    "{0}{1}",
    "${jndi:ldap://127.0.0.1/a}",
    "<script>alert(1)</script>",
    "🔥🔥🔥",
    "👨\u200d👩\u200d👧",
    "İı",
    "ß",
    "ﬀ",
    "Ω",
    "²",  # a digit that int() refuses
    "٣",  # an Arabic-Indic digit int() accepts
    "null",
    "NaN",
    "-1",
    "0",
    "A" * 65,
    "dataRequests/",
    "dataRequests/../x",
    "dataRequests/x/searches/",
    "dataRequests/x\n",
    "permissions/",
    "permissions/%",
    "instances/",
    "instances/..",
    "accounts/",
    "accounts/*",
    "grpc://",
    "grpc://127.0.0.1:²",
    "grpc://[::1]:1",
    "https://user:pw@example.org/",
    "1-0:1.8.0" * 3,
    "ZZ",
    "AT-9999",
]
NAME_PREFIXES = [
    "dataRequests/",
    "permissions/",
    "instances/",
    "accounts/",
    "grpc://",
    "grpcs://",
    "https://",
    "dataRequests/a/searches/",
]
_FILLERS = ["a", "é", "🔥", "\x00", "9", "/", "' OR 1=1 --", "%", " "]


def _repeat(unit: str, length: int) -> str:
    return (unit * (length // max(1, len(unit)) + 1))[:length]


def hostile_text(max_size: int = 100_000) -> Strategy:
    """Empty, control characters, injection-looking, unicode oddities, and huge strings."""
    short = st.one_of(st.sampled_from(HOSTILE_STRINGS), st.text(max_size=40))
    huge = st.builds(
        _repeat,
        st.one_of(st.sampled_from(_FILLERS), st.text(min_size=1, max_size=4)),
        st.one_of(
            st.sampled_from([63, 64, 65, 255, 256, 257, 1024, 4097, 65_536, max_size]),
            st.integers(0, max_size),
        ),
    )
    prefixed = st.builds(lambda p, s: p + s, st.sampled_from(NAME_PREFIXES), short)
    return st.one_of(short, prefixed, huge)


def _ints(low: int, high: int) -> Strategy:
    edges = [
        v for v in (0, 1, -1, 2, 500, 501, 1000, 10_000, 2**31 - 1, -(2**31), 2**63 - 1) if low <= v <= high
    ]
    return st.one_of(st.sampled_from([*edges, low, high]), st.integers(low, high))


def durations() -> Strategy:
    """Durations well-formed and not: out of range, and nanos with the other sign or too big."""
    seconds = st.one_of(
        st.sampled_from([0, 1, -1, 60, 86_400, DURATION_LIMIT, -DURATION_LIMIT, DURATION_LIMIT + 1, *INT64]),
        st.integers(*INT64),
    )
    nanos = st.one_of(
        st.sampled_from([0, 1, -1, 999_999_999, -999_999_999, 1_000_000_000, -1_000_000_000, *INT32]),
        st.integers(*INT32),
    )
    return st.builds(duration_pb2.Duration, seconds=seconds, nanos=nanos)


def timestamps() -> Strategy:
    seconds = st.one_of(
        st.sampled_from([0, -1, -62_135_596_800, -62_135_596_801, 253_402_300_799, 253_402_300_800, *INT64]),
        st.integers(*INT64),
    )
    nanos = st.one_of(st.sampled_from([0, -1, 999_999_999, 1_000_000_000, *INT32]), st.integers(*INT32))
    return st.builds(timestamp_pb2.Timestamp, seconds=seconds, nanos=nanos)


_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: INT32,
    FieldDescriptor.TYPE_SINT32: INT32,
    FieldDescriptor.TYPE_SFIXED32: INT32,
    FieldDescriptor.TYPE_INT64: INT64,
    FieldDescriptor.TYPE_SINT64: INT64,
    FieldDescriptor.TYPE_SFIXED64: INT64,
    FieldDescriptor.TYPE_UINT32: UINT32,
    FieldDescriptor.TYPE_FIXED32: UINT32,
    FieldDescriptor.TYPE_UINT64: UINT64,
    FieldDescriptor.TYPE_FIXED64: UINT64,
}
_WELL_KNOWN = {"google.protobuf.Duration": durations, "google.protobuf.Timestamp": timestamps}


def _is_nested(field: FieldDescriptor) -> bool:
    return field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.full_name not in _WELL_KNOWN


def _hostile_scalar(field: FieldDescriptor, depth: int) -> Strategy:
    if field.type == FieldDescriptor.TYPE_STRING:
        return hostile_text()
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=4096)
    if field.type in _INT_RANGES:
        return _ints(*_INT_RANGES[field.type])
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type == FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        unknown = st.sampled_from([-1, max(known) + 1, *INT32])
        return st.one_of(st.sampled_from(known), unknown, st.integers(*INT32))
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(width=32 if field.type == FieldDescriptor.TYPE_FLOAT else 64)
    if field.message_type.full_name in _WELL_KNOWN:
        return _WELL_KNOWN[field.message_type.full_name]()
    return st.deferred(lambda: _wild(field.message_type, {}, depth + 1))


def _hostile_value(field: FieldDescriptor, depth: int) -> Strategy:
    element = _hostile_scalar(field, depth)
    if not field.is_repeated:
        return element
    few = st.lists(element, max_size=6)
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return few
    # Thousands of items: a few distinct ones repeated (cheap to generate, costly to process).
    many = st.builds(
        lambda items, n: (items * (n // len(items) + 1))[:n],
        st.lists(element.filter(lambda v: not isinstance(v, str) or len(v) < 64), min_size=1, max_size=4),
        st.sampled_from([63, 64, 65, 999, 1000, 1001, 5000, 10_000]),
    )
    return st.one_of(few, few, many)


def _plausible(desc: Descriptor, hints: Hints, depth: int = 0) -> Strategy:
    """Messages with every hinted field set to a plausible value (nested messages likewise)."""
    required: dict[str, Strategy] = {}
    for field in desc.fields:
        if field.name in hints and not _is_nested(field):
            required[field.name] = hints[field.name]
        elif _is_nested(field) and depth < 3:
            required[field.name] = _plausible(field.message_type, hints, depth + 1)
    cls = _message_class(desc)
    return st.fixed_dictionaries(required).map(lambda values: _build(cls, values))


def _wild(desc: Descriptor, hints: Hints, depth: int = 0) -> Strategy:
    """Messages with any subset of fields set, each hostile or (if hinted) plausible."""
    cls = _message_class(desc)
    if depth > 3:
        return st.just(cls())
    optional: dict[str, Strategy] = {}
    for field in desc.fields:
        hostile = _hostile_value(field, depth)
        if _is_nested(field):
            hostile = st.deferred(lambda f=field: _wild(f.message_type, hints, depth + 1))
            if field.is_repeated:
                hostile = st.lists(hostile, max_size=4)
        hint = hints.get(field.name)
        optional[field.name] = (
            st.one_of(hint, hostile) if hint is not None and not _is_nested(field) else hostile
        )
    return st.fixed_dictionaries({}, optional=optional).map(lambda values: _build(cls, values))


@st.composite
def _mutated(draw: st.DrawFn, template: Strategy, desc: Descriptor) -> Message:
    """A plausible message with one to three fields (possibly nested) replaced by hostile values."""
    message = draw(template)
    for _ in range(draw(st.integers(1, 3))):
        target, fields = message, list(desc.fields)
        while True:
            field = draw(st.sampled_from(fields))
            nested = _is_nested(field) and not field.is_repeated
            if nested and draw(st.booleans()):
                target, fields = getattr(target, field.name), list(field.message_type.fields)
                continue
            break
        target.ClearField(field.name)
        if draw(st.integers(0, 5)):  # sometimes the field is just left unset
            _assign(target, field, draw(_hostile_value(field, 1)))
    return message


def messages(descriptor: Descriptor | type[Message], hints: Hints | None = None) -> Strategy:
    """Request messages: plausible ones mutated in a few fields, and wild ones; all under 4 MiB."""
    desc: Descriptor = descriptor if isinstance(descriptor, Descriptor) else descriptor.DESCRIPTOR
    hints = hints or {}
    template = _plausible(desc, hints)
    if not desc.fields:
        return template
    return st.one_of(template, _mutated(template, desc), _wild(desc, hints)).filter(_small_enough)


def _message_class(desc: Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(desc)


def _assign(message: Message, field: FieldDescriptor, value: Any) -> None:
    if field.is_repeated:
        container = getattr(message, field.name)
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            for item in value:
                container.add().CopyFrom(item)
        else:
            container.extend(value)
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        getattr(message, field.name).CopyFrom(value)
    else:
        setattr(message, field.name, value)


def _build(cls: type[Message], values: dict[str, Any]) -> Message:
    message = cls()
    for name, value in values.items():
        _assign(message, cls.DESCRIPTOR.fields_by_name[name], value)
    return message


def _small_enough(message: Message) -> bool:
    return message.ByteSize() < MAX_REQUEST_BYTES


__all__ = ["HOSTILE_STRINGS", "Hints", "durations", "hostile_text", "messages", "timestamps"]
