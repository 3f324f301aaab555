"""The deployment files: docker-compose.yml valid against the Compose Specification's JSON schema (as
shipped by PyPI's docker-compose 1.x, fetched once into pytest's cache), every CACHEPROXY_* variable a
Settings field with a valid example, Prometheus and Grafana wired to what the server really exposes.
No Docker engine runs here: these tests read the files, they do not start containers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from conftest import ServerProcess

from cacheproxy.config import Settings

REPO = Path(__file__).resolve().parents[1]
COMPOSE_PACKAGE = "docker-compose==1.29.2"
SCHEMA_MEMBER = "compose/config/compose_spec.json"


@pytest.fixture(scope="session")
def compose_schema(pytestconfig: pytest.Config) -> dict[str, Any]:
    """The Compose Specification schema from the docker-compose wheel on PyPI (downloaded once)."""
    cache = Path(pytestconfig.cache.mkdir("compose-spec"))
    extracted = cache / "compose_spec.json"
    if not extracted.exists():
        wheels = sorted(cache.glob("docker_compose-*.whl"))
        if not wheels:
            done = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                 COMPOSE_PACKAGE, "-d", str(cache)],
                capture_output=True, text=True, timeout=300, check=False,
            )  # fmt: skip
            wheels = sorted(cache.glob("docker_compose-*.whl"))
            if done.returncode != 0 or not wheels:
                pytest.fail(f"could not download {COMPOSE_PACKAGE} from PyPI for its compose_spec.json "
                            f"(needed once, then cached in {cache}): {done.stderr[-2000:]}", pytrace=False)  # fmt: skip
        with zipfile.ZipFile(wheels[-1]) as wheel:
            extracted.write_bytes(wheel.read(SCHEMA_MEMBER))
    schema = json.loads(extracted.read_text())
    assert schema["id"] == "compose_spec.json" and "service" in schema["definitions"]
    return schema


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def _errors(schema: dict[str, Any], document: Any) -> list[str]:
    validator = jsonschema.Draft201909Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_compose_file_is_valid_against_the_compose_specification(
    compose_schema: dict[str, Any], compose: dict[str, Any]
) -> None:
    assert _errors(compose_schema, compose) == []
    # The validator does check: the same file with a misspelt key or a wrong type is refused.
    broken = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    broken["services"]["proxy"]["healthckeck"] = broken["services"]["proxy"].pop("healthcheck")
    broken["services"]["redis"]["ports"] = 6379
    assert len(_errors(compose_schema, broken)) >= 2


def test_proxy_reserves_one_gpu_keeps_its_data_in_a_volume_and_is_health_checked(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    proxy = services["proxy"]
    (gpu,) = proxy["deploy"]["resources"]["reservations"]["devices"]
    assert gpu == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    assert proxy["build"] == "." and proxy["env_file"] == ".env"
    volume, target = proxy["volumes"][0].split(":")[:2]
    assert target == "/data" and volume in compose["volumes"]
    assert proxy["environment"]["CACHEPROXY_DATA_DIR"] == "/data"
    assert "/health" in " ".join(proxy["healthcheck"]["test"])
    assert proxy["environment"]["CACHEPROXY_REDIS_URL"].startswith("redis://redis:")
    command = services["redis"]["command"]
    assert command[command.index("--maxmemory-policy") + 1] == "allkeys-lru" and "--maxmemory" in command
    # Every file a service mounts from the checkout exists.
    for name, service in services.items():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"


def test_the_replicas_profile_runs_two_proxies_behind_the_router(compose: dict[str, Any]) -> None:
    services = compose["services"]
    in_profile = {n for n, s in services.items() if "replicas" in s.get("profiles", [])}
    assert in_profile == {"proxy-b", "router"}
    assert "profiles" not in services["proxy"]
    b = services["proxy-b"]
    assert b["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert b["volumes"][0].split(":")[0] != services["proxy"]["volumes"][0].split(":")[0]  # own data dir
    command = services["router"]["command"]
    assert command[0] == "route"
    backends = [command[i + 1] for i, arg in enumerate(command) if arg == "--backend"]
    assert backends == ["http://proxy:8000", "http://proxy-b:8000"]
    for service in ("proxy", "proxy-b"):  # both share the one Redis, written through
        env = services[service]["environment"]
        assert env["CACHEPROXY_REDIS_URL"] == "redis://redis:6379/0"
        assert env["CACHEPROXY_CACHE_POLICY"] == "write_through"


def _env_example() -> dict[str, str]:
    """Every KEY=VALUE of .env.example, commented-out examples included."""
    pairs: dict[str, str] = {}
    for line in (REPO / ".env.example").read_text().splitlines():
        m = re.match(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$", line)
        if m:
            pairs[m.group(1)] = m.group(2)
    return pairs


def _compose_environment(compose: dict[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for service in compose["services"].values():
        for key, value in (service.get("environment") or {}).items():
            env[key] = str(value)
    return env


def test_every_cacheproxy_variable_is_a_setting_and_every_example_value_is_valid(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    dockerfile_env = dict(re.findall(r"\b(CACHEPROXY_[A-Z0-9_]+)=(\S+)", (REPO / "Dockerfile").read_text()))
    example = {k: v for k, v in _env_example().items() if k.startswith("CACHEPROXY_")}
    from_compose = {k: v for k, v in _compose_environment(compose).items() if k.startswith("CACHEPROXY_")}
    assert len(example) > 30 and from_compose and dockerfile_env
    fields = set(Settings.model_fields)
    for source, variables in (
        ("compose", from_compose),
        (".env.example", example),
        ("Dockerfile", dockerfile_env),
    ):
        unknown = sorted(k for k in variables if k.removeprefix("CACHEPROXY_").lower() not in fields)
        assert unknown == [], f"{source} passes variables that are no Settings field: {unknown}"
    # Settings reads them as the containers would: every example value parses.
    for name in list(os.environ):
        if name.startswith("CACHEPROXY_"):
            monkeypatch.delenv(name)
    for key, value in {**dockerfile_env, **example, **from_compose}.items():
        monkeypatch.setenv(key, value)
    settings = Settings(_env_file=None)
    assert settings.redis_url == "redis://redis:6379/0" and settings.cache_policy == "write_through"
    assert settings.redis_max_bytes == 8 << 30 and settings.api_keys["sk-change-me"] == "team-a"
    assert settings.router_policy == "affinity" and settings.host == "0.0.0.0"


def _strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


def test_every_variable_compose_interpolates_is_documented_in_env_example(compose: dict[str, Any]) -> None:
    values = " ".join(_strings(compose))
    used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", values))
    assert used, "compose interpolates no variable?"
    assert sorted(used - set(_env_example())) == []
    # ... and its default there agrees with compose's own fallback.
    defaults = dict(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):-([^}]*)\}", values))
    assert {k: _env_example()[k] for k in defaults} == defaults


def test_prometheus_scrapes_every_proxy_replica_and_the_router(compose: dict[str, Any]) -> None:
    config = yaml.safe_load((REPO / "deploy/prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert all(job.get("metrics_path", "/metrics") == "/metrics" for job in config["scrape_configs"])
    assert targets == {f"{name}:8000" for name in ("proxy", "proxy-b", "router")}
    assert set(name for name, _ in (t.split(":") for t in targets)) <= set(compose["services"])
    mounts = compose["services"]["prometheus"]["volumes"]
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts


def _dashboard() -> dict[str, Any]:
    return json.loads((REPO / "deploy/grafana/dashboards/cacheproxy.json").read_text())


def test_grafana_provisions_the_datasource_and_the_dashboard_it_uses(compose: dict[str, Any]) -> None:
    prov = REPO / "deploy/grafana/provisioning"
    (datasource,) = yaml.safe_load((prov / "datasources/prometheus.yml").read_text())["datasources"]
    assert datasource["url"] == "http://prometheus:9090" and datasource["type"] == "prometheus"
    (provider,) = yaml.safe_load((prov / "dashboards/cacheproxy.yml").read_text())["providers"]
    mounts = dict(m.split(":")[:2] for m in compose["services"]["grafana"]["volumes"])
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    dashboard = _dashboard()
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    assert uids == {datasource["uid"]}
    titles = " | ".join(p["title"] for p in dashboard["panels"])
    for wanted in ("hit rate by tier", "time to first token by cache state", "kv tier use"):
        assert wanted in titles.lower()


def test_dashboard_queries_only_metrics_the_server_and_router_expose(
    server: ServerProcess, client: Any
) -> None:
    from cacheproxy.server.router import Router

    # One request, so that every family (the TTFT histogram by cache state included) has samples.
    client.chat.completions.create(model=client.models.list().data[0].id,
                                   messages=[{"role": "user", "content": "hello"}], max_tokens=2)  # fmt: skip
    exposition = server.request("GET", "/metrics", key=None).body.decode()
    exposed = set(re.findall(r"^(cacheproxy_[a-z_]+)", exposition, flags=re.M))
    router = Router(Settings(_env_file=None), ["http://127.0.0.1:1"])
    for family in router.metrics.registry.collect():
        exposed |= {family.name, family.name + "_total"}
    exprs = [t["expr"] for p in _dashboard()["panels"] for t in p["targets"]]
    queried = set(re.findall(r"\bcacheproxy_[a-z_]+", " ".join(exprs)))
    assert queried and sorted(queried - exposed) == []
    # The families this deployment is about, by their contract names.
    for name in ("cacheproxy_prefix_cache_queries_tokens_total", "cacheproxy_prefix_cache_hits_tokens_total",
                 "cacheproxy_time_to_first_token_seconds_bucket", "cacheproxy_kv_tier_bytes",
                 "cacheproxy_evictions_total", "cacheproxy_requests"):  # fmt: skip
        assert name in queried and name in exposed


def test_dockerfile_builds_the_package_on_a_cuda_pytorch_image() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", dockerfile, flags=re.M)
    assert base and re.fullmatch(r"pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-(runtime|devel)", base.group(1))
    assert re.search(r'pip install "\.\[redis', dockerfile)
    assert 'ENTRYPOINT ["cacheproxy"]' in dockerfile and 'CMD ["serve"]' in dockerfile
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".git", ".env"} <= set(ignored) and "!.env.example" in ignored
