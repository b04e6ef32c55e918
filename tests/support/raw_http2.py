"""One gRPC call over a raw HTTP/2 connection, for header bytes that grpc-python refuses to send."""

from __future__ import annotations

import asyncio
import re
import struct

# grpc-python refuses to send header values outside printable ASCII, so these go out as raw HTTP/2.
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _hpack_int(value: int) -> bytes:
    """HPACK integer with a 7-bit prefix (string lengths, Huffman bit clear)."""
    if value < 127:
        return bytes([value])
    out, value = [127], value - 127
    while value >= 128:
        out.append((value & 127) | 128)
        value >>= 7
    return bytes([*out, value])


def _literal(name: bytes, value: bytes) -> bytes:
    """A literal header field without indexing, new name, no Huffman coding."""
    return b"\x00" + _hpack_int(len(name)) + name + _hpack_int(len(value)) + value


async def raw_grpc_call(
    port: int, path: bytes, headers: list[tuple[bytes, bytes]], timeout: float = 5.0
) -> tuple[int, str]:
    """One unary call with an empty request over a fresh HTTP/2 connection; (grpc-status, grpc-message)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    block = b"".join(
        _literal(k, v)
        for k, v in [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path),
            (b":authority", b"localhost"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            *headers,
        ]
    )
    writer.write(PREFACE + _frame(4, 0, 0, b""))  # empty SETTINGS
    writer.write(_frame(1, 0x4, 1, block))  # HEADERS, END_HEADERS
    writer.write(_frame(0, 0x1, 1, b"\x00\x00\x00\x00\x00"))  # an empty message, END_STREAM
    await writer.drain()
    buffer, blocks = b"", b""
    try:
        async with asyncio.timeout(timeout):
            while True:
                chunk = await reader.read(65536)
                assert chunk, f"connection closed before the call ended; got {blocks!r}"
                buffer += chunk
                while len(buffer) >= 9 and len(buffer) >= 9 + int.from_bytes(buffer[:3], "big"):
                    length = int.from_bytes(buffer[:3], "big")
                    kind, flags = buffer[3], buffer[4]
                    stream = int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
                    payload, buffer = buffer[9 : 9 + length], buffer[9 + length :]
                    assert kind not in (3, 7), f"stream reset or connection closed: {kind} {payload!r}"
                    if kind == 4 and not flags & 0x1:
                        writer.write(_frame(4, 0x1, 0, b""))  # SETTINGS ACK
                    if kind == 1 and stream == 1:
                        blocks += payload
                        if flags & 0x1:  # END_STREAM: the trailers are in
                            return _status_of(blocks)
    finally:
        writer.close()


def _status_of(blocks: bytes) -> tuple[int, str]:
    # gRPC core sends grpc-status and grpc-message as literals without Huffman coding.
    status = re.search(rb"\x0bgrpc-status([\x01-\x7e])", blocks)
    message = re.search(rb"\x0cgrpc-message([\x00-\x7e])", blocks)
    assert status is not None, blocks
    code = blocks[status.end() : status.end() + status.group(1)[0]]
    text = b"" if message is None else blocks[message.end() : message.end() + message.group(1)[0]]
    return int(code), text.decode()
