"""Object-store faults on demand: an S3-compatible server (moto) on 127.0.0.1 and a TCP relay in front of it that
can be taken down (connections reset) for a while, by command or when a request matching a pattern passes through.
Used by tests/test_storage_faults.py and benchmarks/soak_faults.py."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(timeout_s: float = 30.0) -> tuple[subprocess.Popen, str]:
    """(process, endpoint URL) of a moto S3 server on a free local port, once it accepts connections."""
    port = free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"moto_server did not start on port {port} within {timeout_s:.0f} s")


class FlakyEndpoint:
    """A TCP relay to the S3 server that can be down (connections reset) for a while, by command or when a
    request whose bytes match `trip` passes through it."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.down_until = 0.0
        self.trip: re.Pattern | None = None
        self.trip_down_s = 0.0
        self.tripped = threading.Event()
        self.refused = 0
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def down(self, seconds: float) -> None:
        self.down_until = time.monotonic() + seconds

    def up(self) -> None:
        self.down_until = 0.0

    def is_down(self) -> bool:
        return time.monotonic() < self.down_until

    def close(self) -> None:
        self._stop = True
        self.server.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            if self.is_down():
                self._reset(conn)
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                self._reset(conn)
                continue
            threading.Thread(target=self._pipe, args=(conn, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, conn, False), daemon=True).start()

    def _reset(self, conn: socket.socket) -> None:
        self.refused += 1
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.close()

    def _pipe(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if from_client and self.trip is not None and self.trip.search(data):
                    self.trip = None
                    self.down(self.trip_down_s)
                    self.tripped.set()
                if self.is_down():
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass
