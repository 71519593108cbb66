"""Several uvicorn workers share the port, each on a socket of its own (tracker/server.py)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from tests.support import Server, socket_inodes, wait_for, worker_pids

pytestmark = [pytest.mark.skipif(sys.platform != "linux", reason="reads /proc; SO_REUSEPORT"),
              pytest.mark.slow]


def _tcp(port: int, state: str) -> set[int]:
    """Inodes of the IPv4 sockets on a local port in a state (/proc/net/tcp: 01 established,
    0A listening)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == state:
            inodes.add(int(fields[9]))
    return inodes


def test_connections_opened_at_once_are_spread_over_the_workers(module_dsn: str,
                                                                  tmp_path: Path) -> None:
    srv = Server(module_dsn, tmp_path, env={"TRACKER_WORKERS": "2"}).start()
    try:
        assert srv.proc is not None
        # Both workers listen once their start-up is done (the first may answer before).
        wait_for(lambda: len(_tcp(srv.port, "0A")) == 2, 30, message="two listening sockets")
        listening = _tcp(srv.port, "0A")
        workers = [pid for pid in worker_pids(srv.proc.pid) if socket_inodes(pid) & listening]
        assert len(workers) == 2
        clients = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(32)]
        try:
            for client in clients:
                client.sendall(b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n")
            for client in clients:
                assert client.recv(4096).startswith(b"HTTP/1.1 200")
            established = _tcp(srv.port, "01")
            held = {pid: len(socket_inodes(pid) & established) for pid in workers}
        finally:
            for client in clients:
                client.close()
        assert sum(held.values()) == 32, held
        # Spread by a hash of the client's port: fewer than 4 of 32 on one worker has a
        # chance of about 3 in a million. On one shared socket, one worker took them all.
        assert all(n >= 4 for n in held.values()), held
    finally:
        srv.stop()


def test_a_port_in_use_is_a_clear_error_with_several_workers(module_dsn: str,
                                                             tmp_path: Path) -> None:
    srv = Server(module_dsn, tmp_path, env={"TRACKER_WORKERS": "2"})
    taken = socket.socket()
    taken.bind(("127.0.0.1", srv.port))
    taken.listen()
    try:
        with pytest.raises(AssertionError, match="server exited") as failed:
            srv.start(timeout=60)
    finally:
        taken.close()
        srv.stop()
    assert "address already in use" in str(failed.value).lower(), failed.value
    assert "Traceback" not in str(failed.value), failed.value
