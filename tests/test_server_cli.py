"""`cacheproxy serve`: flags are settings, the default model is the built-in tiny one, signals shut it
down gracefully."""

from __future__ import annotations

import argparse
import shutil
import signal
import threading
import typing
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import ServerProcess, start_server, stop_server

from cacheproxy.cli import SUBCOMMANDS, add_settings_arguments, build_parser, settings_from_args
from cacheproxy.config import Settings
from cacheproxy.engine.model_files import tiny_model_path
from cacheproxy.server.auth import is_loopback


def test_every_setting_is_a_flag() -> None:
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    assert {a.dest for a in parser._actions} >= set(Settings.model_fields)
    assert "serve" in [c.name for c in SUBCOMMANDS]


def test_loopback_is_recognised_for_the_keyless_admin_routes() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("127.8.9.1") and is_loopback("::1")
    assert not is_loopback("10.0.0.5") and not is_loopback("192.168.1.2") and not is_loopback("2001:db8::1")
    assert not is_loopback(None) and not is_loopback("not-an-ip")


def test_flags_override_the_environment_and_the_rest_comes_from_it(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    monkeypatch.setenv("CACHEPROXY_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.setenv("CACHEPROXY_PORT", "9001")
    monkeypatch.setenv("CACHEPROXY_MAX_NUM_SEQS", "7")
    args = build_parser().parse_args([
        "serve", "--model", "org/model", "--port", "9002", "--host", "0.0.0.0", "--data-dir", str(tmp_path),
        "--device", "cpu", "--api-key", "k1=team-a", "--api-key", "k2=team-b", "--no-cuda-graphs",
        "--cache-scope", "global", "--gpu-memory-utilization", "0.5", "--max-model-len", "1024",
        "--backend", "http://127.0.0.1:1", "--backend", "http://127.0.0.1:2",
    ])
    s = settings_from_args(args)
    assert (s.model, s.port, s.host, s.data_dir, s.device) == ("org/model", 9002, "0.0.0.0", tmp_path, "cpu")
    assert s.api_keys == {"k1": "team-a", "k2": "team-b"}
    assert (s.cuda_graphs, s.cache_scope, s.gpu_memory_utilization, s.max_model_len) == (False, "global", 0.5, 1024)
    assert s.router_backends == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    assert s.max_num_seqs == 7  # not given as a flag: the environment's
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--device", "tpu"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--api-key", "no-equals-sign"])


def test_a_setting_out_of_range_stops_with_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    from cacheproxy.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["serve", "--block-size", "0"])
    assert exc.value.code == 2
    assert "block_size" in capsys.readouterr().err


@pytest.fixture
def default_model_server(tiny_model_dir: Path, tmp_path: Path) -> typing.Iterator[ServerProcess]:
    # No --model: the built-in tiny model under the data dir. It is copied there from the session's
    # so that its tokenizer is not trained again.
    data_dir = tmp_path / "data"
    shutil.copytree(tiny_model_dir, tiny_model_path(data_dir))
    srv = start_server(["--kv-cache-bytes", str(8 << 20), "--cpu-cache-bytes", str(8 << 20)], data_dir)
    yield srv
    stop_server(srv)


def test_serve_without_a_model_serves_the_tiny_one_to_any_key_and_stops_gracefully_on_sigterm(
    default_model_server: ServerProcess,
) -> None:
    srv = default_model_server
    with openai.OpenAI(base_url=srv.base_url + "/v1", api_key="anything", max_retries=0) as client:
        model = client.models.list().data[0].id
        stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=48, temperature=0, stream=True,
                                                stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True})
        chunks: list[Any] = []
        for chunk in stream:
            chunks.append(chunk)
            if len(chunks) == 2:
                # SIGTERM while a request streams: it still finishes, then the server exits.
                threading.Thread(target=srv.process.send_signal, args=(signal.SIGTERM,)).start()
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 48
    assert srv.process.wait(30) == 0
    log = srv.log_text()
    assert '"shutting_down"' in log and '"server_stopped"' in log
    records = (srv.data_dir / "records.jsonl").read_text().splitlines()
    assert len(records) == 1 and '"tenant":"default"' in records[0] and '"status":200' in records[0]


def test_admin_routes_without_an_admin_key_are_served_to_loopback(default_model_server: ServerProcess) -> None:
    reply = default_model_server.request("GET", "/admin/stats", key=None)
    assert reply.status == 200
    assert reply.json()["engine"]["requests"] == {"running": 0, "waiting": 0}


def test_serve_with_a_model_it_cannot_find_exits_1_with_the_reason_and_no_traceback(tmp_path: Path) -> None:
    import subprocess
    import sys

    missing = tmp_path / "no-such-model"
    done = subprocess.run(
        [sys.executable, "-m", "cacheproxy.cli", "serve", "--model", str(missing), "--port", "0",
         "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert f"model folder '{missing}' does not exist" in out and "engine_start_failed" in out
    assert "Traceback" not in out
