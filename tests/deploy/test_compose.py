"""deploy/compose: valid against the Compose specification's JSON schema (and `docker compose config`
where the Compose plugin is installed), three nodes with the cluster key from a compose secret, one
node publishing the HTTP API, a Prometheus scraping all three; its configs load with their own tools."""

from __future__ import annotations

import json

import jsonschema
import pytest
import yaml

from node.config import load_settings
from tests.deploy._tools import DEPLOY, SCHEMAS, run, tool

COMPOSE = DEPLOY / "compose" / "compose.yaml"
NODES = ("alice", "bob", "carol")


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def validator() -> jsonschema.Draft7Validator:
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    assert schema["$schema"].startswith("https://json-schema.org/draft-07/")
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)


def test_compose_file_is_valid_against_the_compose_specification_schema():
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator().iter_errors(compose())]
    assert errors == []


@pytest.mark.parametrize("mutate, expected", [
    (lambda doc: doc["services"]["alice"].update(portz=["8400:8400"]), "portz"),
    (lambda doc: doc["services"]["bob"].update(secrets="cluster_key"), "is not of type 'array'"),
    (lambda doc: doc.update(secret={}), "secret"),
])
def test_the_schema_rejects_a_misspelt_or_mistyped_key(mutate, expected):
    doc = compose()
    mutate(doc)
    messages = [e.message for e in validator().iter_errors(doc)]
    assert any(expected in message for message in messages), messages


def test_three_nodes_share_the_cluster_key_secret_and_only_alice_publishes_http_on_loopback():
    doc = compose()
    services = doc["services"]
    assert set(services) == {*NODES, "prometheus"}
    assert doc["secrets"]["cluster_key"]["file"].endswith("/swarm.key}")
    for name in NODES:
        node = services[name]
        assert "cluster_key" in node["secrets"] and node["command"] == ["daemon"]
        assert node["environment"]["ACCELMESH_CONFIG"] == "/etc/accelmesh/accelmesh.toml"
        assert node["configs"] == [{"source": "accelmesh_toml", "target": "/etc/accelmesh/accelmesh.toml"}]
        assert [v.split(":")[1] for v in node["volumes"]] == ["/var/lib/accelmesh"]
        assert node["build"]["dockerfile"] == "deploy/docker/Dockerfile.cpu"
    published = {name: services[name].get("ports") for name in NODES if services[name].get("ports")}
    assert published == {"alice": ["127.0.0.1:8400:8400"]}


def test_the_shared_toml_loads_with_accelmeshs_loader_and_names_the_mounted_secrets():
    doc = compose()
    settings = load_settings(config=COMPOSE.parent / doc["configs"]["accelmesh_toml"]["file"], env={})
    assert settings.cluster_key == "/run/secrets/cluster_key"  # compose mounts secret NAME at /run/secrets/NAME
    assert settings.http_api_keys_file == "/run/secrets/http_api_key"
    assert settings.http == "0.0.0.0:8400" and settings.listen == ("/ip4/0.0.0.0/tcp/4001",)


def test_prometheus_scrapes_all_three_with_the_api_key_and_loads_the_shipped_rules():
    doc = compose()
    prometheus = doc["services"]["prometheus"]
    assert prometheus["image"].startswith("prom/prometheus:v")
    assert "http_api_key" in prometheus["secrets"] and prometheus["group_add"] == ["10001"]
    assert doc["configs"]["alerts_yml"]["file"] == "../prometheus/alerts.yml"
    config = yaml.safe_load((COMPOSE.parent / doc["configs"]["prometheus_yml"]["file"]).read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "accelmesh" and job["authorization"]["credentials_file"] == "/run/secrets/http_api_key"
    assert sorted(job["static_configs"][0]["targets"]) == [f"{name}:8400" for name in NODES]


def test_compose_prometheus_config_passes_promtool(tmp_path):
    """`promtool check config` on the compose Prometheus config, laid out as the containers see it."""
    doc = compose()
    config = (COMPOSE.parent / doc["configs"]["prometheus_yml"]["file"]).read_text()
    key = tmp_path / "http_api_key"
    key.write_text("k" * 32 + "\n")
    (tmp_path / "prometheus.yml").write_text(config.replace("/run/secrets/http_api_key", str(key)))
    (tmp_path / "alerts.yml").write_text((COMPOSE.parent / doc["configs"]["alerts_yml"]["file"]).read_text())
    out = run([tool("promtool"), "check", "config", str(tmp_path / "prometheus.yml")])
    assert out.returncode == 0, out.stdout + out.stderr
    rules = sum(len(group["rules"]) for group in yaml.safe_load((tmp_path / "alerts.yml").read_text())["groups"])
    assert f"SUCCESS: {rules} rules found" in out.stdout + out.stderr, out.stdout + out.stderr
