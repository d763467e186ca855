"""A TCP proxy in front of Redis, for tests of what chatd does when Redis's
answer is lost after Redis acted on the command (a timeout, a dead worker):

- `hold(pattern, count)`: the next `count` client connections that send a
  command containing `pattern` (bytes) get no more replies from Redis. The
  command itself is passed on, so Redis runs it: the reply is what is lost.
  `reached` counts the holds so far; `held_ports` lists the client ports of
  the held connections (to find the process holding one: `pid_of_client`,
  with the proxy's `port`).

Each connection is two pumping threads; everything else passes unchanged."""

import os
import socket
import threading
from typing import Iterable, Optional

from harness.stack import LOOPBACK

CHUNK = 65536


class RedisProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.lock = threading.Lock()
        self.pattern: Optional[bytes] = None
        self.holds_left = 0
        self.held_ports: "list[int]" = []
        self.reached = threading.Semaphore(0)
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((LOOPBACK, 0))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        self.host = LOOPBACK
        self.stopped = threading.Event()
        self.sockets: "list[socket.socket]" = []
        self.thread = threading.Thread(target=self._accept_loop, daemon=True)

    def hold(self, pattern: bytes, count: int = 1) -> None:
        with self.lock:
            self.pattern = pattern
            self.holds_left = count

    def holds(self) -> int:
        with self.lock:
            return len(self.held_ports)

    def _accept_loop(self) -> None:
        while not self.stopped.is_set():
            try:
                client, addr = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.sockets += [client, upstream]
            state = {"held": False, "port": addr[1]}
            threading.Thread(target=self._pump_requests, args=(client, upstream, state), daemon=True).start()
            threading.Thread(target=self._pump_replies, args=(upstream, client, state), daemon=True).start()

    def _pump_requests(self, src: socket.socket, dst: socket.socket, state: dict) -> None:
        tail = b""
        try:
            while True:
                data = src.recv(CHUNK)
                if not data:
                    break
                matched = False
                with self.lock:
                    # A pattern may straddle two reads; the tail kept is one
                    # byte too short to hold a whole (earlier) match.
                    window = tail + data
                    keep = len(self.pattern) - 1 if self.pattern else 0
                    tail = window[len(window) - keep:] if keep else b""
                    if (not state["held"] and self.pattern is not None and self.holds_left > 0
                            and self.pattern in window):
                        self.holds_left -= 1
                        state["held"] = True
                        self.held_ports.append(state["port"])
                        matched = True
                dst.sendall(data)
                if matched:
                    self.reached.release()  # the command is on its way to Redis
        except OSError:
            pass
        finally:
            self._close(src, dst)

    def _pump_replies(self, src: socket.socket, dst: socket.socket, state: dict) -> None:
        try:
            while True:
                data = src.recv(CHUNK)
                if not data:
                    break
                with self.lock:
                    held = state["held"]
                if not held:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            self._close(src, dst)

    @staticmethod
    def _close(*socks: socket.socket) -> None:
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> "RedisProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.listener.close()
        with self.lock:
            socks = list(self.sockets)
        for s in socks:
            self._close(s)
            s.close()


def pid_of_client(pids: Iterable[int], local_port: int, remote_port: int) -> Optional[int]:
    """The process among `pids` that owns the TCP connection from loopback
    `local_port` to `remote_port` (found through /proc/net/tcp and
    /proc/PID/fd). Closed sockets still listed (TIME_WAIT) have inode 0."""
    inode = None
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if (int(fields[1].split(":")[1], 16) == local_port and int(fields[2].split(":")[1], 16) == remote_port
                    and fields[9] != "0"):
                inode = fields[9]
                break
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return pid
            except OSError:
                continue
    return None
