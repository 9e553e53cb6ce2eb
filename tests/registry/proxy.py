"""A TCP proxy for the registry tier that cuts a connection in the middle: the client sees the network
drop that a resumable upload or download must survive."""
from __future__ import annotations

import socket
import threading
from typing import Optional


class CuttingProxy:
    """Listens on 127.0.0.1 and forwards to UPSTREAM ('host:port'). Once, when more than CUT_AFTER bytes
    have gone in DIRECTION ('up': client to registry, 'down': registry to client) over one connection,
    it forwards the bytes up to that point and closes both sides. With direction 'responses' it cuts
    between requests instead: once, right after passing on the CUT_AFTER-th response of a connection
    (a kept-alive connection the server closed). Counts the bytes of each direction."""

    def __init__(self, upstream: str, cut_after: Optional[int] = None, direction: str = "down"):
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.cut_after = cut_after
        self.direction = direction
        self.cuts = 0
        self.bytes = {"up": 0, "down": 0}
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.host = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()
        for sock in list(self._open):
            _shut(sock)

    def __enter__(self) -> CuttingProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            self._open += [client, server]
            state = {"count": 0}
            threading.Thread(target=self._pump, args=(client, server, "up", state), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, "down", state), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, direction: str, state: dict) -> None:
        try:
            while True:
                data = source.recv(1 << 16)
                if not data:
                    break
                with self._lock:
                    cut = self.cut_after is not None and not self.cuts
                    if cut and self.direction == "responses" and direction == "down":
                        state["count"] += data.count(b"HTTP/1.1 ")
                        cut = state["count"] >= self.cut_after
                        self.cuts += cut
                    elif cut and direction == self.direction and state["count"] + len(data) > self.cut_after:
                        data = data[:self.cut_after - state["count"]]
                        self.cuts += 1
                    else:
                        cut = False
                    state["count"] += len(data) if direction == self.direction else 0
                    self.bytes[direction] += len(data)
                sink.sendall(data)
                if cut:
                    _shut(source)
                    _shut(sink)
                    return
        except OSError:
            pass
        _shut(sink)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
