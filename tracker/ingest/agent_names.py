"""The browser and OS names ua-parser's rules spell out: the only names tracker stores.

A rule names its family either literally (`family_replacement: 'Chrome Mobile'`) or by
copying a capture group of its pattern (`$1`). Where that group can only match a few
fixed strings (`(Firefox|Chrome)/`), those strings are names too; where it can match
anything (`(\\w+)-iPhone/`), what it copies is text from the agent (an app's name, or a
person's: "Jane.Doe-iPhone/1.0"), and the parser's answer is stored as "other".
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from typing import Any

with warnings.catch_warnings():  # the regex parser's public names, deprecated but kept
    warnings.simplefilter("ignore", DeprecationWarning)
    import sre_constants as _c
    import sre_parse as _p

# A group that can match more strings than this is treated as open text.
_MAX_STRINGS = 64
_REFERENCE = re.compile(r"\$(\d)")


def known_names(matchers: Iterable[Any]) -> frozenset[str]:
    """Every family the matchers (ua-parser's user-agent or OS rules) can return that is
    not copied from open text."""
    names: set[str] = set()
    for matcher in matchers:
        template = matcher.family or "$1"
        references = sorted({int(n) for n in _REFERENCE.findall(template)})
        if not references:
            names.add(template.strip())
            continue
        try:
            parsed = _p.parse(matcher.regex)
        except re.error:
            continue
        results: set[str] | None = {template}
        for number in references:
            group = _group(parsed, number)
            strings = _strings(group) if group is not None else None
            if strings is None or results is None:
                results = None
                break
            results = {r.replace(f"${number}", s) for r in results for s in strings}
        if results is not None:
            names.update(r.strip() for r in results if r.strip())
    return frozenset(names)


def _group(items: Any, number: int) -> Any:
    """The parsed contents of capture group `number`, or None."""
    for op, arg in items:
        if op is _c.SUBPATTERN:
            if arg[0] == number:
                return arg[-1]
            found = _group(arg[-1], number)
        elif op is _c.BRANCH:
            found = next((g for b in arg[1] if (g := _group(b, number)) is not None), None)
        elif op in (_c.MAX_REPEAT, _c.MIN_REPEAT):
            found = _group(arg[2], number)
        else:
            continue
        if found is not None:
            return found
    return None


def _strings(items: Any) -> set[str] | None:
    """Every string a parsed pattern can match, or None when there are too many or
    infinitely many."""
    out = {""}
    for op, arg in items:
        if op is _c.AT:  # anchors match no text
            continue
        if op is _c.LITERAL:
            options: set[str] | None = {chr(arg)}
        elif op is _c.SUBPATTERN:
            options = _strings(arg[-1])
        elif op is _c.BRANCH:
            options = set()
            for branch in arg[1]:
                more = _strings(branch)
                if more is None:
                    return None
                options |= more
        elif op is _c.IN and all(o is _c.LITERAL for o, _ in arg):
            options = {chr(a) for _, a in arg}
        elif op in (_c.MAX_REPEAT, _c.MIN_REPEAT) and arg[1] <= 1:
            options = _strings(arg[2])
            if options is not None and arg[0] == 0:
                options.add("")
        else:
            return None
        if options is None:
            return None
        out = {a + b for a in out for b in options}
        if len(out) > _MAX_STRINGS:
            return None
    return out
