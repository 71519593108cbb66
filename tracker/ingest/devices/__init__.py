"""Matomo device-detector's device type of a user agent, at a cost a hot path can pay.

Matomo's rules (the YAML files the `device-detector` package ships: a regex per brand,
then per model, each naming a type such as smartphone, tablet or tv) know which of
thousands of Android models is a tablet; user-agent tokens alone cannot. The package
itself takes tens of milliseconds an agent, trying the regexes one after another. Here
the same rules, in Matomo's order, are split into small pieces indexed by the words each
needs (`regex_split`); one Aho-Corasick scan of an agent picks the few pieces worth
trying, so an agent costs tens of microseconds. The prepared index is cached as JSON,
keyed by the package's version and this code, so that a worker loads it in well under a
tenth of a second; building it takes a second or two of CPU, once, in a process of its
own (`python -m tracker.ingest.devices`), so that no worker keeps the memory building
takes.

`device_type` then applies Matomo's own rules for agents no model names (DeviceDetector.php
`parseDevice`: Chrome on Android without "Mobile" is a tablet, "Android TV" is a tv, a
desktop system is a desktop, ...). The reference is Matomo device-detector 6.5.

The modules, each one part:
    rules.py         Matomo's rule files: where the package keeps them, read into the index's form
    index.py         the word index: the first brand and model whose regex matches an agent
    pieces.py        one piece of a regex, compiled on first use, matched at a word start
    cache.py         the index cached as JSON, built by a process of its own (__main__.py)
    parse_device.py  Matomo's rules for the type (DeviceDetector.php, parseDevice)
"""

from tracker.ingest.devices.cache import ensure_cached, load
from tracker.ingest.devices.index import Brand, DeviceIndex
from tracker.ingest.devices.parse_device import DESKTOP_SYSTEMS, device_type
from tracker.ingest.devices.rules import FILES, PACKAGE, build, package_rules_dir

__all__ = ["DESKTOP_SYSTEMS", "FILES", "PACKAGE", "Brand", "DeviceIndex", "build",
           "device_type", "ensure_cached", "load", "package_rules_dir"]
