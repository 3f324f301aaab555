"""Shared fixtures: the tiny model (made once per session), a real `cacheproxy serve` on 127.0.0.1 with it,
and helpers to talk to that server with the official openai client or plain HTTP."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]

# The session server's keys: two tenants and an admin.
ALICE_KEY = "sk-test-alice"
BOB_KEY = "sk-test-bob"
ADMIN_KEY = "sk-test-admin"
SERVED_MODEL = "tiny-test"
# Long enough that an unaborted long request would run for seconds (see the disconnect tests).
MAX_MODEL_LEN = 2048
MAX_BODY_BYTES = 64 << 10


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in tiny model (random weights, locally trained tokenizer), written once per session."""
    from cacheproxy.engine.model_files import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("tiny-model-data"))


@dataclass
class HttpReply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class ServerProcess:
    """A `cacheproxy serve` subprocess on 127.0.0.1."""

    port: int
    data_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                key: str | None = ALICE_KEY, timeout: float = 60.0) -> HttpReply:
        """One plain HTTP request: `body` bytes go as they are, anything else as JSON."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            hdrs = dict(headers or {})
            data: bytes | None = None
            if body is not None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                hdrs.setdefault("Content-Type", "application/json")
            if key is not None:
                hdrs.setdefault("Authorization", f"Bearer {key}")
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            return HttpReply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def admin_stats(self) -> dict[str, Any]:
        reply = self.request("GET", "/admin/stats", key=ADMIN_KEY)
        assert reply.status == 200, reply.body
        return reply.json()

    def wait_until_idle(self, timeout: float = 30.0) -> float:
        """Seconds until the engine runs and holds no request. Engine stats are a snapshot the engine
        thread publishes every few tens of milliseconds, so they are polled, not read once."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.admin_stats()["engine"]["requests"] == {"running": 0, "waiting": 0}:
                return time.monotonic() - start
            time.sleep(0.02)
        raise AssertionError(f"engine still busy after {timeout}s")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(args: list[str], data_dir: Path, env: dict[str, str] | None = None,
                 wait_ready: bool = True, timeout: float = 180.0) -> ServerProcess:
    """Starts `python -m cacheproxy.cli serve` with these flags and waits for /health to say 200."""
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "server.log"
    # the checkout first; what PYTHONPATH held stays after it (the GPU machine's carried wheels)
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    full_env = {**os.environ, "PYTHONPATH": path, "CACHEPROXY_CONFIG": str(data_dir / "none.toml"), **(env or {})}
    cmd = [sys.executable, "-m", "cacheproxy.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--data-dir", str(data_dir), "--device", "cpu", "--log-json", *args]
    with log_path.open("wb") as log_file:
        # cwd: the data dir, so that no .env or cacheproxy.toml of the checkout leaks in.
        proc = subprocess.Popen(cmd, cwd=data_dir, env=full_env, stdout=log_file, stderr=subprocess.STDOUT)
    server = ServerProcess(port, data_dir, proc, log_path)
    if wait_ready:
        wait_until_healthy(server, timeout)
    return server


def wait_until_healthy(server: ServerProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log_text()[-4000:]}")
        try:
            if server.request("GET", "/health", key=None, timeout=2).status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    stop_server(server)
    raise RuntimeError(f"server not healthy after {timeout}s:\n{server.log_text()[-4000:]}")


def stop_server(server: ServerProcess, timeout: float = 30.0) -> int:
    """SIGTERM (a graceful shutdown), then SIGKILL if it hangs; returns the exit code."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    return int(server.process.returncode)


@pytest.fixture(scope="session")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One real server for the session: the tiny model, two tenants (alice, bob) and an admin key."""
    data_dir = tmp_path_factory.mktemp("server-data")
    srv = start_server(
        [
            "--model", str(tiny_model_dir),
            "--served-model-name", SERVED_MODEL,
            "--api-key", f"{ALICE_KEY}=alice",
            "--api-key", f"{BOB_KEY}=bob",
            "--admin-key", ADMIN_KEY,
            "--max-model-len", str(MAX_MODEL_LEN),
            "--max-body-bytes", str(MAX_BODY_BYTES),
            "--max-num-seqs", "64",
            "--kv-cache-bytes", str(16 << 20),
            "--cpu-cache-bytes", str(16 << 20),
            "--default-max-tokens", "16",
        ],
        data_dir,
    )
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path) -> Any:
    from cacheproxy.engine.tokenizer import Tokenizer

    return Tokenizer(tiny_model_dir)


@pytest.fixture
def client(server: ServerProcess) -> Iterator[Any]:
    """The official sync openai client as tenant alice; no retries, so errors surface as they are."""
    import openai

    with openai.OpenAI(base_url=server.base_url + "/v1", api_key=ALICE_KEY, max_retries=0, timeout=120) as c:
        yield c


def async_client(server: ServerProcess, key: str = ALICE_KEY) -> Any:
    """The official async openai client; use as `async with async_client(server) as c:` inside a test
    (it binds to the test's own event loop)."""
    import openai

    return openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0, timeout=120)


# A pool this small (16-token blocks) is filled by a handful of requests, and with no CPU or disk tier an
# evicted block is really gone: what pin, evict and pressure tests need.
SMALL_POOL_BLOCKS = 48


@pytest.fixture(scope="session")
def small_pool_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A real server with a 48-block KV pool and no lower tiers; tenants alice and bob, an admin key."""
    data_dir = tmp_path_factory.mktemp("small-pool-server")
    srv = start_server(
        [
            "--model", str(tiny_model_dir),
            "--served-model-name", SERVED_MODEL,
            "--api-key", f"{ALICE_KEY}=alice",
            "--api-key", f"{BOB_KEY}=bob",
            "--admin-key", ADMIN_KEY,
            "--num-kv-blocks", str(SMALL_POOL_BLOCKS),
            "--max-num-batched-tokens", "256",
            "--max-model-len", "640",
            "--cpu-cache-bytes", "0",
            "--no-disk-cache-enabled",
        ],
        data_dir,
        env={"OMP_NUM_THREADS": "1"},
    )
    yield srv
    stop_server(srv)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Runs `cacheproxy ARGV` in this process; returns the exit status, stdout and stderr.

    main() configures logging for the whole process, bound to the stderr of the moment (here capsys's,
    closed after the test), so the configuration of before is put back for the tests that follow."""
    import logging

    import structlog

    from cacheproxy.cli import main

    saved = structlog.get_config()
    root = logging.getLogger()
    root_level, root_handlers = root.level, list(root.handlers)
    capsys.readouterr()  # drop what came before
    try:
        code = main(list(argv))
    finally:
        structlog.configure(**saved)
        root.setLevel(root_level)
        root.handlers[:] = root_handlers
    out, err = capsys.readouterr()
    return code, out, err
