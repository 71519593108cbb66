"""The journal's records on disk.

A journal segment (store/journal.py) is a sequence of records:

    magic  4 bytes  b"\\xffTJ1"
    length 4 bytes  payload length, little-endian
    crc    4 bytes  CRC32 (zlib) of the payload, little-endian
    payload         an optional label line, then COPY text lines, exactly as the
                    pipeline made them, each "\\n"-terminated

A label line is `#`, text and "\\n": what its writer says about the lines that follow (the
batch writer: the lane it sorted them for and the days they fall on, so that a replay
passes them to PostgreSQL whole instead of reading every line again; store/lanes.py).
It is not an event; a COPY line never starts with `#` (its first field is a number).

The payload holds the policy-filtered lines, and labels made of their own fields, and
nothing else: no raw address or user agent can reach the disk. 0xFF never occurs in
UTF-8, so a header cannot appear inside a payload: after a corrupt stretch the next real
header is found by searching for the magic.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Sequence

MAGIC = b"\xffTJ1"
_HEADER = struct.Struct("<4sII")
HEADER_BYTES = _HEADER.size
# A record's payload is at most this; a longer append is split into several records.
MAX_PAYLOAD_BYTES = 4 << 20


def to_payloads(lines: Sequence[str], label: str) -> list[bytes]:
    """The lines in payloads of at most MAX_PAYLOAD_BYTES, each starting with the label."""
    head = f"#{label}\n".encode() if label else b""
    data = "".join(lines).encode()
    if len(head) + len(data) <= MAX_PAYLOAD_BYTES:  # the usual case: one payload, no line read
        return [head + data]
    payloads: list[bytes] = []
    part: list[bytes] = [head]
    size = len(head)
    for line in lines:
        encoded = line.encode()
        if len(part) > 1 and size + len(encoded) > MAX_PAYLOAD_BYTES:
            payloads.append(b"".join(part))
            part, size = [head], len(head)
        part.append(encoded)
        size += len(encoded)
    payloads.append(b"".join(part))
    return payloads


def unlabelled(payload: bytes) -> tuple[str, bytes]:
    """A payload's label ("": none) and its lines."""
    if not payload.startswith(b"#"):
        return "", payload
    end = payload.find(b"\n")
    if end < 0:
        return payload[1:].decode(errors="replace"), b""
    return payload[1:end].decode(errors="replace"), payload[end + 1:]


def record(payload: bytes) -> bytes:
    """The payload with its header."""
    return _HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def valid_record(fd: int, offset: int, end: int) -> bytes | None:
    """The payload of the record at offset, if its header and checksum are whole and right."""
    if offset + HEADER_BYTES > end:
        return None
    header = os.pread(fd, HEADER_BYTES, offset)
    if len(header) < HEADER_BYTES:
        return None
    magic, length, crc = _HEADER.unpack(header)
    if magic != MAGIC or length > MAX_PAYLOAD_BYTES or offset + HEADER_BYTES + length > end:
        return None
    payload = os.pread(fd, length, offset + HEADER_BYTES)
    if len(payload) != length or zlib.crc32(payload) != crc:
        return None
    return payload


def next_valid_header(fd: int, start: int, end: int) -> int:
    """The offset of the first valid record at or after start, or end if there is none."""
    rest = os.pread(fd, end - start, start) if end > start else b""
    found = rest.find(MAGIC)
    while found >= 0:
        if valid_record(fd, start + found, end) is not None:
            return start + found
        found = rest.find(MAGIC, found + 1)
    return end
