"""Key-value stores for the rendezvous and the heartbeats of a multi-process run.

Two stores, one small interface (`set`, `get`, `get_many`, `delete`, `close`; keys are short
strings, values bytes):
- `TCPStoreServer` + `TCPStoreClient`: a threaded socket server inside rank 0's process
  (MASTER_ADDR:MASTER_PORT); rank 0 talks to it in process (`server.local()`), the other ranks
  over TCP. When rank 0's process ends, the store ends with it: the other ranks notice that as
  "rank 0 stopped responding".
- `FileStore`: one file per key in a directory on a filesystem every node sees (NFS, Lustre,
  GPFS). Writes are atomic (`<key>.tmp-<pid>` then `os.replace`); readers poll.

Wire format (TCP): every message is a 4-byte big-endian length and a JSON object; values are
base64. Requests: {"op": "set", "key", "value"}, {"op": "get", "keys": [...]} ->
{"values": [b64 | null]}, {"op": "del", "key"}. The store holds a few hundred bytes per rank, is
unauthenticated and binds all interfaces: it is for trusted cluster networks, like torchrun's.

Everything that can fail raises `StoreError` (an OSError) with a message naming the address.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import socketserver
import struct
import threading
import time
from pathlib import Path

_HEADER = struct.Struct("!I")
_MAX_MESSAGE = 1 << 24


class StoreError(OSError):
    """The store cannot be reached or answered nonsense; the message names its address."""


def _send(sock: socket.socket, obj: dict) -> None:
    data = json.dumps(obj).encode()
    sock.sendall(_HEADER.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(left)
        if not chunk:
            raise ConnectionError("connection closed by the peer")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket) -> dict:
    (n,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    if n > _MAX_MESSAGE:
        raise ConnectionError(f"message of {n} bytes is over the {_MAX_MESSAGE}-byte limit")
    return json.loads(_recv_exact(sock, n))


def _b64(value: bytes | None):
    return None if value is None else base64.b64encode(value).decode()


def _unb64(value):
    return None if value is None else base64.b64decode(value)


class _Table:
    """The store's contents: a dict behind a lock (shared by the server threads and rank 0)."""

    def __init__(self):
        self._data: dict = {}
        self._lock = threading.Lock()

    def set(self, key: str, value: bytes) -> None:
        if not isinstance(value, (bytes, bytearray)):
            raise TypeError(f"store values are bytes, got {type(value).__name__}")
        with self._lock:
            self._data[key] = bytes(value)

    def get(self, key: str) -> bytes | None:
        with self._lock:
            return self._data.get(key)

    def get_many(self, keys) -> list:
        with self._lock:
            return [self._data.get(k) for k in keys]

    def delete(self, key: str) -> None:
        with self._lock:
            self._data.pop(key, None)

    def close(self) -> None:
        pass


class _Handler(socketserver.BaseRequestHandler):
    def setup(self):
        with self.server.lock:
            self.server.clients.add(self.request)

    def finish(self):
        with self.server.lock:
            self.server.clients.discard(self.request)

    def handle(self):
        table: _Table = self.server.table
        sock = self.request
        while True:
            try:
                req = _recv(sock)
            except (ConnectionError, OSError, ValueError):
                return  # client went away (or spoke garbage): drop the connection
            op = req.get("op")
            try:
                if op == "set":
                    table.set(req["key"], _unb64(req["value"]))
                    reply = {"ok": True}
                elif op == "get":
                    reply = {"values": [_b64(v) for v in table.get_many(req["keys"])]}
                elif op == "del":
                    table.delete(req["key"])
                    reply = {"ok": True}
                else:
                    reply = {"error": f"unknown op {op!r}"}
            except (KeyError, TypeError, ValueError) as e:
                reply = {"error": f"bad request: {e}"}
            try:
                _send(sock, reply)
            except OSError:
                return


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True  # rebinding a port in TIME_WAIT; never two live listeners


class TCPStoreServer:
    """The store, served from this process on `port` (0: any free port; see `.port`)."""

    def __init__(self, port: int, host: str = ""):
        self.table = _Table()
        try:
            self._server = _Server((host, port), _Handler)
        except OSError as e:
            raise StoreError(f"cannot listen on port {port} for the rendezvous store ({e}); "
                             "is another run using it? pick another MASTER_PORT / --master-port") from e
        self._server.table = self.table
        self._server.clients, self._server.lock = set(), threading.Lock()
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="llmc-store",
                                        daemon=True)
        self._thread.start()

    def local(self) -> _Table:
        """The in-process view rank 0 uses (same interface as a client, no socket)."""
        return self.table

    def close(self) -> None:
        """Stop listening and drop every open connection (as rank 0's exit would)."""
        self._server.shutdown()
        self._server.server_close()
        with self._server.lock:
            for sock in list(self._server.clients):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class TCPStoreClient:
    """A connection to a `TCPStoreServer`; connecting retries until `connect_timeout_s`.

    Thread-safe (one request at a time). A request that fails reconnects once before raising.
    """

    def __init__(self, host: str, port: int, connect_timeout_s: float, io_timeout_s: float = 30.0):
        self.host, self.port = host, int(port)
        self.io_timeout_s = io_timeout_s
        self._lock = threading.Lock()
        self._sock = None
        deadline = time.monotonic() + connect_timeout_s
        last = None
        while True:
            try:
                self._connect()
                return
            except OSError as e:
                last = e
            if time.monotonic() >= deadline:
                raise StoreError(
                    f"could not reach the rendezvous store of rank 0 at {self.address} within "
                    f"{connect_timeout_s:.0f}s ({last}); is rank 0 running, and are MASTER_ADDR/"
                    "MASTER_PORT the same on every node and reachable from this one?")
            time.sleep(0.2)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), timeout=min(self.io_timeout_s, 5.0))
        sock.settimeout(self.io_timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock

    def _request(self, req: dict) -> dict:
        with self._lock:
            for attempt in (0, 1):
                try:
                    if self._sock is None:
                        self._connect()
                    _send(self._sock, req)
                    reply = _recv(self._sock)
                    break
                except (OSError, ValueError) as e:
                    if self._sock is not None:
                        self._sock.close()
                        self._sock = None
                    if attempt == 1:
                        raise StoreError(f"rendezvous store at {self.address}: {e}") from e
        if "error" in reply:
            raise StoreError(f"rendezvous store at {self.address}: {reply['error']}")
        return reply

    def set(self, key: str, value: bytes) -> None:
        self._request({"op": "set", "key": key, "value": _b64(value)})

    def get(self, key: str) -> bytes | None:
        return self.get_many([key])[0]

    def get_many(self, keys) -> list:
        keys = list(keys)
        values = self._request({"op": "get", "keys": keys})["values"]
        if len(values) != len(keys):
            raise StoreError(f"rendezvous store at {self.address}: asked for {len(keys)} keys, "
                             f"got {len(values)} values")
        return [_unb64(v) for v in values]

    def delete(self, key: str) -> None:
        self._request({"op": "del", "key": key})

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


class FileStore:
    """Keys as files in `directory` (created if missing) on a filesystem shared by all ranks."""

    def __init__(self, directory):
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the rendezvous directory {self.directory} ({e}); "
                             "give a writable path on a filesystem shared by every node") from e

    @property
    def address(self) -> str:
        return f"file://{self.directory}"

    def _path(self, key: str) -> Path:
        if not key or key.startswith(".") or any(c in key for c in "\\\0"):
            raise ValueError(f"bad store key {key!r}")
        return self.directory / key.replace("/", "~")

    def set(self, key: str, value: bytes) -> None:
        path = self._path(key)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        try:
            with open(tmp, "wb") as f:
                f.write(value)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            raise StoreError(f"cannot write {path} ({e}); is {self.directory} writable from this node?") from e

    def get(self, key: str) -> bytes | None:
        try:
            with open(self._path(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"cannot read {self._path(key)} ({e})") from e

    def get_many(self, keys) -> list:
        return [self.get(k) for k in keys]

    def delete(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StoreError(f"cannot remove {self._path(key)} ({e})") from e

    def close(self) -> None:
        pass
