"""A real redis-server for tests: on a free 127.0.0.1 port, data in a temp dir, no persistence.

`start_redis(dir)` returns a running `RedisServer`; `stop()` ends it, `start()` brings it back on
the same port, `pause()`/`resume()` freeze it (SIGSTOP/SIGCONT: connections are accepted by the
kernel, but nothing answers, which is what a hung Redis looks like). `start_redis_cluster(dir)`
makes a three-master Redis Cluster with redis-cli. A missing binary fails with what to install,
never skips: scripts/setup.sh dev installs redis-server.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest


def redis_binary(name: str = "redis-server") -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not installed: the Redis tests need a real Redis. Run `scripts/setup.sh dev` "
            "(or `apt-get install -y redis-server`).",
            pytrace=False,
        )
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_node_port() -> int:
    """A free port whose cluster bus port (port + 10000, Redis's rule) is free and exists."""
    for _ in range(1000):
        port = free_port()
        if port <= 55535 and _port_is_free(port + 10000):
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def command(port: int, *args: str, timeout: float = 2.0) -> bytes:
    """One command over a raw socket (RESP); the reply's raw bytes. Keeps the helper free of the
    client under test."""
    payload = f"*{len(args)}\r\n".encode() + b"".join(
        f"${len(a.encode())}\r\n".encode() + a.encode() + b"\r\n" for a in args
    )
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        return s.recv(1 << 16)


@dataclass
class RedisServer:
    port: int
    workdir: Path
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [
            redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
            "--save", "", "--appendonly", "no", "--daemonize", "no", *self.extra_args,
        ]  # fmt: skip
        log = (self.workdir / f"redis-{self.port}.log").open("ab")
        self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}: {self.log_text()}")
            try:
                if command(self.port, "PING", timeout=0.5).startswith(b"+PONG"):
                    return
            except OSError:
                pass
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING within {timeout}s: {self.log_text()}")

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)  # a paused server cannot handle SIGTERM
        proc.kill()
        proc.wait(10)

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def log_text(self) -> str:
        path = self.workdir / f"redis-{self.port}.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""


def start_redis(workdir: Path, extra_args: list[str] | None = None) -> RedisServer:
    server = RedisServer(free_port(), workdir, list(extra_args or []))
    server.start()
    return server


@dataclass
class RedisCluster:
    nodes: list[RedisServer]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def start_redis_cluster(workdir: Path, masters: int = 3, timeout: float = 20.0) -> RedisCluster:
    """`masters` cluster-enabled servers joined by `redis-cli --cluster create` (no replicas)."""
    nodes: list[RedisServer] = []
    try:
        for i in range(masters):
            port = cluster_node_port()
            node = RedisServer(
                port,
                workdir / f"node{i}",
                ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                 "--cluster-node-timeout", "2000"],
            )  # fmt: skip
            node.start()
            nodes.append(node)
        create = [redis_binary("redis-cli"), "--cluster", "create",
                  *(f"127.0.0.1:{n.port}" for n in nodes), "--cluster-replicas", "0", "--cluster-yes"]  # fmt: skip
        done = subprocess.run(create, capture_output=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout!r} {done.stderr!r}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(b"cluster_state:ok" in command(n.port, "CLUSTER", "INFO") for n in nodes):
                return RedisCluster(nodes)
            time.sleep(0.05)
        raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")
    except BaseException:
        for node in nodes:
            node.stop()
        raise
