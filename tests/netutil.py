"""Test helpers for network faults on loopback: a TCP proxy that can stall silently, and a reader
that owns a child process's output pipes."""

from __future__ import annotations

import selectors
import socket
import subprocess
import threading
from typing import Callable, Dict, List, Optional


class StallingProxy:
    """Forwards 127.0.0.1:<port> to an upstream port. `stall()` silently stops forwarding in both
    directions (no FIN, no RST: packets just stop, as on a dead Wi-Fi link or a cut cable behind a
    switch) and holds new connections without connecting them upstream; `resume()` forwards again.
    Connections closed by either end are closed on the other."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1", rcvbuf: Optional[int] = None):
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if rcvbuf:  # a small receive window: a stalled client fills its send buffer soon, as on a dead link
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._peer: Dict[socket.socket, socket.socket] = {}
        self._held: List[socket.socket] = []  # accepted while stalled, not yet connected upstream
        self._stalled = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.connections = 0
        self._thread = threading.Thread(target=self._run, name="stalling-proxy", daemon=True)
        self._thread.start()

    def stall(self) -> None:
        self._stalled.set()

    def resume(self) -> None:
        self._stalled.clear()

    def _connect(self, client: socket.socket) -> None:
        try:
            up = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            client.close()
            return
        up.setblocking(False)
        client.setblocking(False)
        self._peer[client], self._peer[up] = up, client
        self._sel.register(client, selectors.EVENT_READ, "data")
        self._sel.register(up, selectors.EVENT_READ, "data")
        self.connections += 1

    def _close_pair(self, s: socket.socket) -> None:
        other = self._peer.pop(s, None)
        for x in (s, other):
            if x is None:
                continue
            self._peer.pop(x, None)
            try:
                self._sel.unregister(x)
            except (KeyError, ValueError):
                pass
            x.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            stalled = self._stalled.is_set()
            if not stalled and self._held:
                held, self._held = self._held, []
                for c in held:
                    self._connect(c)
            for key, _ev in self._sel.select(timeout=0.05):
                s = key.fileobj
                if key.data is None:  # the listener
                    try:
                        client, _ = s.accept()
                    except BlockingIOError:
                        continue
                    if stalled:
                        self._held.append(client)
                    else:
                        self._connect(client)
                    continue
                if stalled:
                    continue  # leave the bytes where they are: nothing moves, nothing closes
                try:
                    data = s.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                other = self._peer.get(s)
                if not data or other is None:
                    self._close_pair(s)
                    continue
                try:
                    other.setblocking(True)
                    other.sendall(data)
                    other.setblocking(False)
                except OSError:
                    self._close_pair(s)
            if stalled:
                self._stop.wait(0.05)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for s in list(self._peer):
            self._close_pair(s)
        for c in self._held:
            c.close()
        self._sel.close()
        self._listener.close()


class ProcessOutput:
    """Reads a child's stdout and stderr (one thread each, the only readers of those pipes) into line
    lists that tests can wait on; `wait_exit()` never touches the pipes itself."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.stdout: List[str] = []
        self.stderr: List[str] = []
        self._cond = threading.Condition()
        self._threads = [
            threading.Thread(target=self._pump, args=(proc.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._pump, args=(proc.stderr, self.stderr), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _pump(self, pipe, lines: List[str]) -> None:
        if pipe is None:
            return
        for line in pipe:
            with self._cond:
                lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def wait_stderr(self, text: str, timeout: float = 60.0) -> bool:
        return self.wait_for(lambda: any(text in ln for ln in self.stderr), timeout)

    def wait_exit(self, timeout: float) -> Optional[int]:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        for t in self._threads:
            t.join(10)
        return rc

    def stop(self, timeout: float = 60.0) -> Optional[int]:
        """SIGTERM, then SIGKILL if it does not stop in time."""
        if self.proc.poll() is None:
            self.proc.terminate()
        rc = self.wait_exit(timeout)
        if rc is None:
            self.proc.kill()
            rc = self.wait_exit(10)
        return rc
