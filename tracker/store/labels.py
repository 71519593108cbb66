"""Tags and metadata: what a sender attaches to campaigns and messages to find them again.

Both are bounded, so that neither can carry a message body or grow a row without limit:
at most `MAX_TAGS` tags of at most `MAX_TAG_CHARS` characters; metadata is a flat JSON
object of at most `MAX_METADATA_KEYS` keys whose values are strings, numbers, true, false
or null, `MAX_METADATA_BYTES` bytes in all as JSON. No control characters anywhere.
"""

from __future__ import annotations

import math
import unicodedata
from typing import Any

import orjson

MAX_TAGS = 20
MAX_TAG_CHARS = 64
MAX_METADATA_KEYS = 50
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_BYTES = 2048


class InvalidLabel(ValueError):
    """Tags or metadata the API refuses (422); the message says where and why."""


def _has_control(value: str) -> bool:
    return any(unicodedata.category(c) == "Cc" for c in value)


def check_tag(value: object, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidLabel(f"{where}: must be a non-empty string")
    if _has_control(value):
        raise InvalidLabel(f"{where}: contains a control character")
    if len(value.strip()) > MAX_TAG_CHARS:
        raise InvalidLabel(f"{where}: longer than {MAX_TAG_CHARS} characters")
    return value.strip()


def check_tags(value: object, where: str = "tags") -> list[str]:
    """A list of tags, white space around each taken off, duplicates dropped (in order)."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidLabel(f"{where}: must be a list of strings")
    tags = list(dict.fromkeys(check_tag(t, f"{where}[{i}]") for i, t in enumerate(value)))
    if len(tags) > MAX_TAGS:
        raise InvalidLabel(f"{where}: at most {MAX_TAGS} tags")
    return tags


def check_metadata(value: object, where: str = "metadata") -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidLabel(f"{where}: must be a JSON object")
    if len(value) > MAX_METADATA_KEYS:
        raise InvalidLabel(f"{where}: at most {MAX_METADATA_KEYS} keys")
    for key, item in value.items():
        if not key or len(key) > MAX_METADATA_KEY_CHARS or _has_control(key):
            raise InvalidLabel(f"{where}: a key must be 1 to {MAX_METADATA_KEY_CHARS} "
                               "characters without control characters")
        if isinstance(item, float) and not math.isfinite(item):
            raise InvalidLabel(f"{where}.{key}: must be a finite number")
        if isinstance(item, str) and _has_control(item.replace("\t", "")):
            raise InvalidLabel(f"{where}.{key}: contains a control character")
        if not (item is None or isinstance(item, str | bool | int | float)):
            raise InvalidLabel(f"{where}.{key}: must be a string, a number, true, false or "
                               "null (metadata is flat)")
    size = len(encode_metadata(value))
    if size > MAX_METADATA_BYTES:
        raise InvalidLabel(f"{where}: {size} bytes as JSON, more than {MAX_METADATA_BYTES}")
    return value


def encode_metadata(value: dict[str, Any]) -> str:
    try:
        return orjson.dumps(value).decode()
    except TypeError as exc:  # an integer past 64 bits
        raise InvalidLabel(f"metadata: {exc}") from None


def decode_metadata(stored: str | None) -> dict[str, Any]:
    decoded: dict[str, Any] = orjson.loads(stored) if stored else {}
    return decoded
