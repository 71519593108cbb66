"""The word index of Matomo's brand and model regexes, and its JSON form's arrays."""

from __future__ import annotations

import array
import base64
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tracker.ingest.devices.pieces import Test, compiled, found

# The JSON form's version: the cache's name depends on it.
FORMAT = 2
# A hostile agent could name thousands of models; past this many regex tries it gets
# no brand, and Matomo's rules that need none still apply.
_MAX_TRIES = 64


@dataclass(frozen=True, slots=True)
class Brand:
    name: str
    file: int  # index into rules.FILES
    type: str | None  # its `device:`
    models: range  # its owners (see DeviceIndex) that are models, in order


class DeviceIndex:
    """Matomo's brand and model regexes, first match in Matomo's order.

    Every regex (an "owner": a brand's, or one of its models') is split into pieces;
    pieces are numbered in Matomo's order, brand by brand, a brand's own before its
    models'. The words a piece needs map to its number."""

    def __init__(self, form: dict[str, Any]) -> None:
        import ahocorasick_rs
        import regex  # noqa: F401 -- now, rather than in the first agent that needs it

        self.source = str(form["source"])
        self.brands = [Brand(str(name), int(file), kind, range(int(first), int(end)))
                       for name, file, kind, first, end in form["brands"]]
        types: dict[str, str] = {}  # one string object per type, not one per model
        self._owner_brand = numbers(form["owner_brand"])
        self._owner_type = [types.setdefault(t, t) if t else None for t in form["owner_type"]]
        self._patterns: list[str] = form["patterns"]
        self._piece_owner = numbers(form["piece_owner"])
        self._relaxed = {int(piece): str(text) for piece, text in form["relaxed"].items()}
        self._word_start = numbers(form["word_start"])
        self._word_pieces = numbers(form["word_pieces"])
        self._always = tuple(int(piece) for piece in form["always"])
        self._tests: list[Test | None] = [None] * len(self._patterns)
        if not (len(self._piece_owner) == len(self._patterns)
                and len(self._word_start) == len(form["words"]) + 1
                and len(self._owner_type) == len(self._owner_brand)
                and all(isinstance(p, str) for p in self._patterns)
                and all(t is None or isinstance(t, str) for t in self._owner_type)):
            raise ValueError("inconsistent device index")
        self._automaton = ahocorasick_rs.AhoCorasick(form["words"])

    def first(self, user_agent: str, files: Iterable[int]) -> tuple[Brand, str | None] | None:
        """The first brand (of `files`, in Matomo's order) whose regex matches, and the
        type its first matching model names (else the brand's); None when none matches."""
        wanted = frozenset(files)
        text = user_agent.lower()  # the pieces are lower-cased: see pieces.compiled
        start, pieces = self._word_start, self._word_pieces
        candidates = set(self._always)
        for word, _, _ in self._automaton.find_matches_as_indexes(text, overlapping=True):
            candidates.update(pieces[start[word]:start[word + 1]])
        ordered = sorted(candidates)
        tries = 0
        for position, piece in enumerate(ordered):
            owner = self._piece_owner[piece]
            brand = self.brands[self._owner_brand[owner]]
            if owner >= brand.models.start or brand.file not in wanted:
                continue  # a model's piece, or a parser Matomo does not run on this agent
            tries += 1
            if tries > _MAX_TRIES:
                return None
            if not self._matches(piece, text):
                continue
            for model_piece in ordered[position + 1:]:
                model = self._piece_owner[model_piece]
                if model >= brand.models.stop:
                    break
                if model in brand.models:
                    tries += 1
                    if tries > _MAX_TRIES:
                        break
                    if self._matches(model_piece, text):
                        return brand, self._owner_type[model] or brand.type
            return brand, brand.type
        return None

    def _matches(self, piece: int, text: str) -> bool:
        test = self._tests[piece]
        if test is None:  # compiled on first use: most pieces never are
            test = self._tests[piece] = compiled(self._patterns[piece],
                                                 self._relaxed.get(piece))
        return found(test, text)


def numbers(encoded: str) -> array.array[int]:
    """An array of unsigned ints, from its base64 form in the JSON cache."""
    result = array.array("I")
    result.frombytes(base64.b64decode(encoded, validate=True))
    return result


def encoded(ints: Iterable[int]) -> str:
    """The base64 form of an array of unsigned ints, in this machine's byte order."""
    return base64.b64encode(array.array("I", ints).tobytes()).decode("ascii")
