"""The uvicorn and httptools internals tracker's wire protocol relies on, checked against the
installed versions.

`tracker.ingest.protocol.TrackingHttpProtocol` subclasses uvicorn's private
`HttpToolsProtocol`: it overrides some of its methods (four of them, `data_received`,
`on_url`, `on_header`, `send_400_response`, replaced by code of its own that keeps what
uvicorn's did), calls others, reads and writes its attributes and those of its request
cycles, its flow control and its server state, and is called back by httptools' parser.
None of that is uvicorn's public API, so pyproject.toml holds uvicorn and httptools to the
versions this file was reviewed against (REVIEWED), and an upgrade that changes any of it
fails here, naming what changed.

To move to a newer uvicorn: raise the bounds in pyproject.toml and REVIEWED here, refresh
the lock (requirements/refresh.sh), install it, and run this file. For each failure, read uvicorn's
change to what it names, bring protocol.py in line, and update the table here (the message
gives the new value); then run tests/test_protocol.py and tests/test_wire.py.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import textwrap
import tomllib
import weakref
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httptools
import uvicorn
from packaging.requirements import Requirement
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState
from uvicorn.supervisors import Multiprocess

from tracker.ingest import protocol
from tracker.ingest.protocol import TrackingHttpProtocol

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
REVIEWED = "uvicorn 0.55.0, httptools 0.9.0"
INSTALLED = f"uvicorn {version('uvicorn')}, httptools {version('httptools')}"

# uvicorn's methods that TrackingHttpProtocol overrides, with their parameters: uvicorn
# calls them, so each override takes what the base method takes.
OVERRIDDEN = {
    "__init__": "(self, config, server_state, app_state, _loop=None)",
    "connection_made": "(self, transport)",
    "connection_lost": "(self, exc)",
    "data_received": "(self, data)",
    "send_400_response": "(self, msg)",
    "_start_asgi_task": "(self, cycle, app)",
    "on_message_begin": "(self)",
    "on_url": "(self, url)",
    "on_header": "(self, name, value)",
    "on_headers_complete": "(self)",
    "on_body": "(self, body)",
    "on_message_complete": "(self)",
    "on_response_complete": "(self)",
    "shutdown": "(self)",
    "pause_writing": "(self)",
    "resume_writing": "(self)",
}

# uvicorn's methods that it calls and leaves as they are.
CALLED = {
    "_unset_keepalive_if_required": "(self)",
    "_should_upgrade": "(self)",
    "handle_websocket_upgrade": "(self)",
    "_unsupported_upgrade_warning": "(self)",
}

# The code of uvicorn's that the protocol was written against (REVIEWED): a digest of each
# method's syntax tree (comments and layout do not count). The overridden methods are
# either replaced by tracker's own version of them or extended around a call to them, and
# the called ones do what the protocol expects; the request cycle's `receive` is what an
# app reading a body sees when the protocol refuses the request (`_refuse`).
FINGERPRINTS = {
    "HttpToolsProtocol.__init__": "00443043bea6761e",
    "HttpToolsProtocol.connection_made": "acdde3b1feda895b",
    "HttpToolsProtocol.connection_lost": "57f91eb8d08c0749",
    "HttpToolsProtocol.data_received": "acbe954a13ed6566",
    "HttpToolsProtocol.send_400_response": "20bed2b9f5388abb",
    "HttpToolsProtocol._start_asgi_task": "8456b93aeba61b6d",
    "HttpToolsProtocol.on_message_begin": "4294ff927d3acca1",
    "HttpToolsProtocol.on_url": "bc68cf78b01cc50c",
    "HttpToolsProtocol.on_header": "e6f8e41d3b90b8eb",
    "HttpToolsProtocol.on_headers_complete": "ecff2e577ea27e2b",
    "HttpToolsProtocol.on_body": "54275cb9f3e46b0a",
    "HttpToolsProtocol.on_message_complete": "2c5bf60e45208bd7",
    "HttpToolsProtocol.on_response_complete": "8a769d10c29642ff",
    "HttpToolsProtocol.shutdown": "54f6bb3a398194f7",
    "HttpToolsProtocol.pause_writing": "627a58f30e375c9d",
    "HttpToolsProtocol.resume_writing": "5eef392a4d7d830b",
    "HttpToolsProtocol._unset_keepalive_if_required": "d4c38df8bf219cd5",
    "HttpToolsProtocol._should_upgrade": "e196db021513b685",
    "HttpToolsProtocol.handle_websocket_upgrade": "4720044bf1fdefb6",
    "HttpToolsProtocol._unsupported_upgrade_warning": "ec3bc182a3a947e4",
    "RequestResponseCycle.receive": "34f316bf4d515351",
    "FlowControl.pause_reading": "905b511c41fb7ebd",
    "FlowControl.resume_reading": "6cd4662cd1675c9d",
    "FlowControl.pause_writing": "80ded10accf6a8f2",
    "FlowControl.resume_writing": "492f11c2e177fd4c",
}

# What the protocol reads of a request cycle (`self.cycle`, `self._answering`, the cycles
# waiting in `self.pipeline`) and sets on it.
CYCLE_ATTRIBUTES = {"more_body", "response_complete", "response_started", "disconnected",
                    "message_event"}

# How tracker/server.py runs several workers: uvicorn's supervisor, handed a socket of
# tracker's own that each spawned worker unpickles, and the address check before it.
SUPERVISOR = {
    "Multiprocess.__init__": "(self, config, sockets)",
    "Multiprocess.run": "(self)",
    "Config.bind_socket": "(self)",
}


def _changed(what: str, found: object, expected: object,
             module: str = "tracker/ingest/protocol.py") -> str:
    return (f"{what}: {INSTALLED} has {found!r} where the {REVIEWED} that {module} was "
            f"written against had {expected!r}; read uvicorn's change, bring {module} in line "
            "and update tests/test_protocol_internals.py")


def _parameters(function: Callable[..., Any]) -> str:
    """A function's parameters with their defaults, without annotations."""
    signature = inspect.signature(function)
    bare = [p.replace(annotation=inspect.Parameter.empty) for p in signature.parameters.values()]
    return str(signature.replace(parameters=bare, return_annotation=inspect.Signature.empty))


def _class_tree(cls: type) -> ast.ClassDef:
    source = textwrap.dedent(inspect.getsource(cls))
    node = ast.parse(source).body[0]
    assert isinstance(node, ast.ClassDef), cls
    return node


def _methods(tree: ast.ClassDef) -> dict[str, ast.FunctionDef | ast.AsyncFunctionDef]:
    return {node.name: node for node in tree.body
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}


def _self_attributes(tree: ast.AST, owner: str = "self") -> Iterator[ast.Attribute]:
    """Every `owner.NAME` in the tree (`self.flow` for owner "self.flow")."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and ast.unparse(node.value) == owner:
            yield node


def _assigned(tree: ast.AST, owner: str = "self") -> set[str]:
    """The names the tree assigns on `owner` (`self.x = ...`, `self.x += ...`)."""
    names = set()
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        for target in targets:
            for element in target.elts if isinstance(target, ast.Tuple) else [target]:
                if isinstance(element, ast.Attribute) and ast.unparse(element.value) == owner:
                    names.add(element.attr)
    return names


def _fingerprint(function: Callable[..., Any]) -> str:
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()[:16]


OURS = _class_tree(TrackingHttpProtocol)
OUR_METHODS = _methods(OURS)
BASE = _class_tree(HttpToolsProtocol)
# What an instance of uvicorn's protocol has: its methods and class attributes (its own and
# asyncio.Protocol's) and the attributes its methods assign.
BASE_NAMES = set(dir(HttpToolsProtocol)) | _assigned(BASE)


def test_pyproject_allows_the_reviewed_series_only_and_it_is_installed() -> None:
    # A patch release may pass the checks below; a new minor is reviewed first.
    declared = {Requirement(line).name: Requirement(line) for line in
                tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]}
    for name, reviewed in (part.split() for part in REVIEWED.split(", ")):
        major, minor, _ = (int(n) for n in reviewed.split("."))
        series = {f">={major}.{minor}", f"<{major}.{minor + 1}"}
        assert {str(s) for s in declared[name].specifier} == series, (
            f"pyproject.toml allows {name}{declared[name].specifier}, REVIEWED is {reviewed}: "
            "update both together")
        installed = version(name)
        assert installed in declared[name].specifier, _changed(f"{name}'s version", installed,
                                                               reviewed)


def test_the_overridden_methods_are_still_uvicorns_and_take_the_same_parameters() -> None:
    overrides = {name for name in OUR_METHODS if name in BASE_NAMES}
    assert overrides == set(OVERRIDDEN), (
        "the methods TrackingHttpProtocol overrides are not the ones in OVERRIDDEN: "
        f"overridden but not listed {sorted(overrides - set(OVERRIDDEN))}; listed but not "
        f"overridden, or no longer uvicorn's ({INSTALLED}) "
        f"{sorted(set(OVERRIDDEN) - overrides)}")
    for name, expected in OVERRIDDEN.items():
        base_method = getattr(HttpToolsProtocol, name)
        # Defined by uvicorn's protocol itself, not left to asyncio.Protocol or object:
        # uvicorn's code is what calls it, and what the override replaces or extends.
        assert name in vars(HttpToolsProtocol), _changed(f"HttpToolsProtocol.{name}",
                                                         "no such method", expected)
        assert _parameters(base_method) == expected, _changed(
            f"HttpToolsProtocol.{name}'s parameters", _parameters(base_method), expected)
        ours = getattr(TrackingHttpProtocol, name)
        assert _parameters(ours) == expected, (
            f"TrackingHttpProtocol.{name} takes {_parameters(ours)}, uvicorn calls it "
            f"with {expected}")


def test_the_methods_it_calls_are_still_uvicorns_with_the_same_parameters() -> None:
    for name, expected in CALLED.items():
        assert name in vars(HttpToolsProtocol), _changed(f"HttpToolsProtocol.{name}",
                                                         "no such method", expected)
        found = _parameters(getattr(HttpToolsProtocol, name))
        assert found == expected, _changed(f"HttpToolsProtocol.{name}'s parameters", found,
                                           expected)
    called = {node.attr for node in _self_attributes(OURS)
              if node.attr in vars(HttpToolsProtocol) and callable(vars(HttpToolsProtocol)[
                  node.attr]) and node.attr not in OUR_METHODS}
    assert called <= set(CALLED), f"calls uvicorn's {sorted(called - set(CALLED))}: add to CALLED"


def test_uvicorns_code_is_what_the_protocol_was_written_against() -> None:
    changed = []
    for qualified, expected in FINGERPRINTS.items():
        owner, name = qualified.split(".")
        cls = {"HttpToolsProtocol": HttpToolsProtocol, "RequestResponseCycle": RequestResponseCycle,
               "FlowControl": FlowControl}[owner]
        method = vars(cls).get(name)
        if method is None:
            changed.append(f"{qualified}: gone")
            continue
        found = _fingerprint(method)
        if found != expected:
            path = inspect.getsourcefile(method)
            line = inspect.getsourcelines(method)[1]
            changed.append(f"{qualified} ({path}:{line}): fingerprint {found}")
    assert not changed, (f"uvicorn's code differs from the {REVIEWED} that "
                         "tracker/ingest/protocol.py was written against (installed: "
                         f"{INSTALLED}); read each change, bring protocol.py in line and put "
                         "the new fingerprints in FINGERPRINTS:\n" + "\n".join(changed))


def test_every_attribute_of_uvicorns_it_uses_is_still_there() -> None:
    own = _assigned(OUR_METHODS["__init__"]) | (set(OUR_METHODS) - set(OVERRIDDEN))
    used = {node.attr for node in _self_attributes(OURS)}
    missing = sorted(name for name in used - own if name not in BASE_NAMES)
    assert not missing, _changed("HttpToolsProtocol's attributes", f"none of {missing}",
                                 "them")


def test_its_own_names_are_not_uvicorns() -> None:
    # A name uvicorn's protocol started using would be overwritten by tracker's, silently.
    own = _assigned(OUR_METHODS["__init__"]) | (set(OUR_METHODS) - set(OVERRIDDEN))
    taken = sorted(own & BASE_NAMES)
    assert not taken, _changed("HttpToolsProtocol's own names", taken, "none of them")


def test_the_flow_control_parser_and_server_state_it_uses_are_still_there() -> None:
    flow = {node.attr for node in _self_attributes(OURS, "self.flow")}
    flow_names = set(dir(FlowControl)) | _assigned(_class_tree(FlowControl))
    assert flow <= flow_names, _changed("FlowControl", sorted(flow_names),
                                        sorted(flow - flow_names))
    parser = {node.attr for node in _self_attributes(OURS, "self.parser")}
    missing = sorted(name for name in parser if not hasattr(httptools.HttpRequestParser, name))
    assert not missing, _changed("httptools.HttpRequestParser", f"none of {missing}", "them")
    state = {node.attr for node in _self_attributes(OURS, "self.server_state")}
    state_names = _assigned(_class_tree(ServerState))
    assert state <= state_names, _changed("ServerState", sorted(state_names), sorted(state))
    weakref.ref(ServerState())  # protocol._outboxes: one outbox per server, while it lives
    cycle_names = _assigned(_methods(_class_tree(RequestResponseCycle))["__init__"])
    assert cycle_names >= CYCLE_ATTRIBUTES, _changed(
        "RequestResponseCycle's attributes", sorted(cycle_names), sorted(CYCLE_ATTRIBUTES))
    for error in ("HttpParserError", "HttpParserUpgrade"):
        assert issubclass(getattr(httptools, error), Exception), error


class _Recorder:
    """Stands where the protocol does for httptools' parser: notes each callback."""

    def __init__(self, names: set[str]) -> None:
        self.called: set[str] = set()
        for name in names:
            setattr(self, name, self._note(name))

    def _note(self, name: str) -> Callable[..., None]:
        def note(*_: object) -> None:
            self.called.add(name)
        return note


def test_httptools_calls_every_parser_callback_the_protocol_defines() -> None:
    callbacks = {name for name in OUR_METHODS if name.startswith("on_")} - {
        "on_response_complete"}  # uvicorn's, called by its request cycle
    recorder = _Recorder(callbacks)
    parser = httptools.HttpRequestParser(recorder)
    parser.feed_data(b"GET /o/x.gif HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"3\r\nabc\r\n0\r\nTrailer: t\r\n\r\n")
    assert recorder.called == callbacks, _changed(
        "the parser callbacks httptools calls", sorted(recorder.called), sorted(callbacks))


def test_the_supervisor_that_runs_several_workers_is_still_there() -> None:
    for qualified, expected in SUPERVISOR.items():
        owner, name = qualified.split(".")
        cls = {"Multiprocess": Multiprocess, "Config": uvicorn.Config}[owner]
        found = _parameters(getattr(cls, name)) if hasattr(cls, name) else "no such method"
        assert found == expected, _changed(qualified, found, expected, "tracker/server.py")


def test_the_protocol_module_says_which_versions_it_supports() -> None:
    assert REVIEWED in (protocol.__doc__ or ""), f"protocol.py's docstring names {REVIEWED}"
