"""`--metrics HOST:PORT`: Prometheus text over HTTP, served by one small bounded thread.

The supervisor runs as root, so what it serves must stay small whatever a peer does: one
thread (a selector loop) for every connection, at most MAX_CONNECTIONS at once and
PER_SOURCE from one address (the oldest is closed to admit a new one, so a host holding
connections open cannot keep another out), a deadline for each connection's whole request
and answer, requests of at most MAX_REQUEST bytes, a listen backlog, and no traceback for a
peer that goes away. Only ``GET /metrics`` (and ``/``) is answered.
"""
import collections
import logging
import selectors
import socket
import threading
import time

log = logging.getLogger("relay")

MAX_CONNECTIONS = 64
PER_SOURCE = 8
DEADLINE = 5.0                  # seconds for a connection's request and its answer
MAX_REQUEST = 8192
BACKLOG = 128


class _Conn:
    __slots__ = ("sock", "peer", "deadline", "inbuf", "out")

    def __init__(self, sock, peer, deadline):
        self.sock, self.peer, self.deadline = sock, peer, deadline
        self.inbuf = b""
        self.out = None             # bytes left to send once the request is complete


def _response(status, body, ctype="text/plain; charset=utf-8"):
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
              431: "Request Header Fields Too Large"}[status]
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


class MetricsServer:
    """Serve ``render()`` (Prometheus text) at ``addr`` = (host, port) in a daemon thread."""

    def __init__(self, addr, render):
        host, port = addr
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.render = render
        self.lsock = socket.socket(fam, socket.SOCK_STREAM)
        try:
            self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.lsock.bind((host, port))
            self.lsock.listen(BACKLOG)
            self.lsock.setblocking(False)
        except BaseException:
            self.lsock.close()
            raise
        self.address = self.lsock.getsockname()
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.lsock, selectors.EVENT_READ, None)
        self.conns = collections.OrderedDict()        # socket -> _Conn, oldest first
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, daemon=True, name="metrics")
        self.thread.start()

    # -- the loop
    def _loop(self):
        while not self.stopping:
            try:
                events = self.sel.select(0.5)
            except OSError:
                return
            for key, mask in events:
                if key.data is None:
                    self._accept()
                else:
                    self._io(key.data, mask)
            now = time.monotonic()
            for c in [c for c in self.conns.values() if now > c.deadline]:
                self._close(c)

    def _accept(self):
        for _ in range(BACKLOG):
            try:
                sock, peer = self.lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:            # EMFILE and the like: the next round retries
                log.debug("metrics: accept: %s", e)
                return
            sock.setblocking(False)
            same = [c for c in self.conns.values() if c.peer[0] == peer[0]]
            if len(same) >= PER_SOURCE:
                self._close(same[0])
            elif len(self.conns) >= MAX_CONNECTIONS:
                self._close(next(iter(self.conns.values())))
            c = _Conn(sock, peer, time.monotonic() + DEADLINE)
            self.conns[sock] = c
            self.sel.register(sock, selectors.EVENT_READ, c)

    def _io(self, c, mask):
        try:
            if c.out is None:
                data = c.sock.recv(4096)
                if not data:
                    return self._close(c)
                c.inbuf += data
                if b"\r\n\r\n" not in c.inbuf and b"\n\n" not in c.inbuf:
                    if len(c.inbuf) > MAX_REQUEST:
                        self._answer(c, _response(431, b"request too large\n"))
                    return
                self._answer(c, self._handle(c.inbuf))
            else:
                self._send(c)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:                     # the peer went away: nothing to report
            self._close(c)

    def _handle(self, request):
        line = request.split(b"\n", 1)[0].strip().split()
        if len(line) != 3 or not line[2].startswith(b"HTTP/"):
            return _response(400, b"bad request\n")
        method, path = line[0], line[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return _response(405, b"only GET\n")
        if path not in (b"/metrics", b"/"):
            return _response(404, b"not found: try /metrics\n")
        body = self.render().encode()
        resp = _response(200, body, "text/plain; version=0.0.4")
        return resp[:len(resp) - len(body)] if method == b"HEAD" else resp

    def _answer(self, c, data):
        c.out = data
        self.sel.modify(c.sock, selectors.EVENT_WRITE, c)
        self._send(c)

    def _send(self, c):
        n = c.sock.send(c.out)
        c.out = c.out[n:]
        if not c.out:
            self._close(c)

    def _close(self, c):
        if self.conns.pop(c.sock, None) is None:
            return
        try:
            self.sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        c.sock.close()

    @property
    def connections(self):
        return len(self.conns)

    def shutdown(self):
        self.stopping = True
        self.thread.join(2)
        for c in list(self.conns.values()):
            self._close(c)
        self.sel.close()
        self.lsock.close()
