"""deploy/kubernetes: every manifest validates offline against the Kubernetes schemas
(kubernetes-validate, strict), the ServiceMonitor against its CRD's schema; the DaemonSet runs one
non-root daemon per GPU node, and the names it mounts agree with the ConfigMap's accelmesh.toml
(loaded with accelmesh's own loader) and the Secret."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import jsonschema
import pytest

from node.config import load_settings
from node.errors import ConfigError
from node.http.auth import api_keys
from node.mesh.host import load_swarm_key
from tests.deploy._tools import DEPLOY, SCHEMAS, crd_schema, load_yaml_documents, run, strict, tool

K8S = DEPLOY / "kubernetes"
MANIFESTS = sorted(K8S.glob("*.yaml"))
CORE = [path for path in MANIFESTS if path.name != "servicemonitor.yaml"]
# the oldest and newest releases the validator's bundled schemas cover that we support
KUBERNETES_VERSIONS = ("1.31.0", "1.37.0")
SERVICEMONITOR_CRD = SCHEMAS / "monitoring.coreos.com_servicemonitors.yaml"


def manifest(name: str) -> dict:
    (doc,) = load_yaml_documents(K8S / name)
    return doc


def pod_spec() -> dict:
    return manifest("daemonset.yaml")["spec"]["template"]["spec"]


def container() -> dict:
    (daemon,) = pod_spec()["containers"]
    return daemon


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_pass_kubernetes_validate_strict(version):
    assert {p.name for p in CORE} == {"configmap.yaml", "daemonset.yaml", "secret.yaml", "service.yaml"}
    out = run([tool("kubernetes-validate"), "--strict", "-k", version, *map(str, CORE)])
    assert out.returncode == 0, out.stdout + out.stderr
    passed = re.findall(r"^INFO (\S+) passed for resource", out.stdout, re.MULTILINE)
    assert sorted(passed) == sorted(str(p) for p in CORE), out.stdout + out.stderr  # none merely warned about


def test_kubernetes_validate_rejects_a_misspelt_field(tmp_path):
    bad = tmp_path / "daemonset.yaml"
    bad.write_text((K8S / "daemonset.yaml").read_text().replace("hostNetwork: true", "hostNetwerk: true"))
    out = run([tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSIONS[-1], str(bad)])
    assert out.returncode != 0 and "hostNetwerk" in out.stdout + out.stderr, out.stdout + out.stderr


def servicemonitor_validator() -> jsonschema.Draft4Validator:
    (crd,) = load_yaml_documents(SERVICEMONITOR_CRD)
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == "ServiceMonitor"
    return jsonschema.Draft4Validator(strict(crd_schema(crd, "v1")))


def test_servicemonitor_matches_its_crd_schema():
    doc = manifest("servicemonitor.yaml")
    assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "ServiceMonitor"
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in servicemonitor_validator().iter_errors(doc)]
    assert errors == []


@pytest.mark.parametrize("field, value, expected", [
    ("intervall", "15s", "intervall"),
    ("interval", "15 seconds", "does not match"),
])
def test_the_servicemonitor_schema_rejects_a_misspelt_or_malformed_field(field, value, expected):
    doc = manifest("servicemonitor.yaml")
    doc["spec"]["endpoints"][0].pop("interval")
    doc["spec"]["endpoints"][0][field] = value
    messages = [e.message for e in servicemonitor_validator().iter_errors(doc)]
    assert any(expected in message for message in messages), messages


def test_configmap_toml_is_short_and_loads_with_accelmeshs_loader(tmp_path):
    text = manifest("configmap.yaml")["data"]["accelmesh.toml"]
    assert len(text.splitlines()) < 40  # an operator's config, not a copy of deploy/accelmesh.toml
    path = tmp_path / "accelmesh.toml"
    path.write_text(text)
    settings = load_settings(config=path, env={})  # an unknown key or a bad value raises ConfigError
    assert settings.listen == ("/ip4/0.0.0.0/tcp/4001",) and settings.http == "0.0.0.0:8400"
    assert settings.providers.hf_local.device == "cuda"
    assert tomllib.loads(text)  # and it is plain TOML


def test_daemonset_runs_on_gpu_nodes_with_the_host_network():
    spec = pod_spec()
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert container()["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert spec["automountServiceAccountToken"] is False


def test_daemonset_runs_the_daemon_as_the_images_non_root_user_with_probes_on_the_http_port():
    spec, daemon = pod_spec(), container()
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 10001
    assert daemon["securityContext"]["allowPrivilegeEscalation"] is False
    assert daemon["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert daemon["args"] == ["daemon"]
    ports = {port["name"]: port["containerPort"] for port in daemon["ports"]}
    assert ports == {"libp2p": 4001, "http": 8400}
    assert daemon["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert daemon["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    (init,) = spec["initContainers"]
    assert init["image"] == daemon["image"] and "chown 10001:10001" in init["command"][-1]


def test_mounts_agree_with_the_configmap_the_secret_and_the_config_path(tmp_path):
    daemon, volumes = container(), {v["name"]: v for v in pod_spec()["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in daemon["volumeMounts"]}
    env = {e["name"]: e["value"] for e in daemon["env"]}
    config_map, secret = manifest("configmap.yaml"), manifest("secret.yaml")
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    assert Path(env["ACCELMESH_CONFIG"]) == Path(mounts["config"]) / "accelmesh.toml"
    assert "accelmesh.toml" in config_map["data"]
    assert volumes["secrets"]["secret"]["secretName"] == secret["metadata"]["name"]
    path = tmp_path / "accelmesh.toml"
    path.write_text(config_map["data"]["accelmesh.toml"])
    settings = load_settings(config=path, env={})
    for setting in (settings.cluster_key, settings.http_api_keys_file):
        assert Path(setting).parent == Path(mounts["secrets"]), setting
        assert Path(setting).name in secret["stringData"], setting
    assert mounts["data"] == "/var/lib/accelmesh" and volumes["data"]["hostPath"]["path"] == "/var/lib/accelmesh"


def test_the_shipped_secret_placeholders_are_refused_by_the_daemon(tmp_path):
    """A forgotten edit of secret.yaml fails at start instead of running with a published key."""
    data = manifest("secret.yaml")["stringData"]
    key = tmp_path / "swarm.key"
    key.write_text(data["swarm.key"])
    with pytest.raises(ConfigError, match="not a swarm.key file"):
        load_swarm_key(key)
    keys = tmp_path / "http-api-key"
    keys.write_text(data["http-api-key"])
    with pytest.raises(ConfigError, match="at least 16 characters"):
        api_keys((), str(keys))


def test_service_and_servicemonitor_select_the_daemonset_pods_and_its_http_port():
    labels = manifest("daemonset.yaml")["spec"]["template"]["metadata"]["labels"]
    service, monitor = manifest("service.yaml"), manifest("servicemonitor.yaml")
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http" and port["port"] == 8400
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == port["name"] and endpoint["path"] == "/metrics"
    credentials = endpoint["authorization"]["credentials"]
    assert credentials["name"] == manifest("secret.yaml")["metadata"]["name"]
    assert credentials["key"] in manifest("secret.yaml")["stringData"]
    # job="accelmesh", as alerts.yml's AccelmeshTargetDown selects
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "accelmesh"
