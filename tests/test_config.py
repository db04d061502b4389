"""Settings: defaults < TOML < env < flags, the mapping rule, aliases, and errors that name the key."""

import logging
import os
import re
from pathlib import Path

import pytest

from node.config import LOAD_BALANCING_STRATEGIES, iter_specs, load_settings, render_reference
from node.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "accelmesh.toml"
    path.write_text(text)
    return path


def test_defaults_match_the_contract():
    s = load_settings(env={})
    assert s.provider is None and s.model is None
    assert s.provider_cache is True and s.response_cache is True
    assert s.cache_key == "cid" and s.enable_mesh is False and s.load_balancing == "round_robin"
    assert s.request_timeout == 120.0
    assert s.echo.latency_ms == (0.0, 0.0) and s.echo.failure_rate == 0.0 and s.echo.concurrency == 0


def test_later_sources_win_defaults_toml_env_flags(tmp_path):
    toml = write_toml(tmp_path, 'model = "from-toml"\n[echo]\nseed = 1\nfailure_rate = 0.25\n')
    s = load_settings(config=toml, env={})
    assert (s.model, s.echo.seed, s.echo.failure_rate) == ("from-toml", 1, 0.25)
    s = load_settings(config=toml, env={"ACCELMESH_MODEL": "from-env", "ACCELMESH_ECHO_SEED": "2"})
    assert (s.model, s.echo.seed, s.echo.failure_rate) == ("from-env", 2, 0.25)
    s = load_settings(config=toml, env={"ACCELMESH_MODEL": "from-env"}, flags={"model": "from-flag"})
    assert s.model == "from-flag"
    assert s.sources["model"] == "flag --model"
    assert s.sources["echo.failure_rate"] == f"file {toml}"


def test_config_file_from_environment_variable(tmp_path):
    toml = write_toml(tmp_path, 'cache_key = "sha256"\n')
    assert load_settings(env={"ACCELMESH_CONFIG": str(toml)}).cache_key == "sha256"


def test_mapping_rule_holds_for_every_setting():
    for spec in iter_specs():
        parts = (*spec.section, spec.key)
        assert spec.env == "ACCELMESH_" + "_".join(parts).upper()
        assert spec.flag == "--" + "-".join(parts).replace("_", "-")


@pytest.mark.parametrize("raw,expected", [(v, True) for v in ("1", "true", "YES", "on")]
                         + [(v, False) for v in ("0", "false", "No", "off")])
def test_booleans(raw, expected):
    assert load_settings(env={"ACCELMESH_ENABLE_MESH": raw}).enable_mesh is expected


def test_bad_boolean_names_the_key_value_and_source():
    with pytest.raises(ConfigError) as info:
        load_settings(env={"ACCELMESH_RESPONSE_CACHE": "maybe"})
    message = str(info.value)
    assert "response_cache" in message and "'maybe'" in message and "ACCELMESH_RESPONSE_CACHE" in message
    assert "1/true/yes/on" in message


@pytest.mark.parametrize(
    "primary,alias,value",
    [
        ("ACCELMESH_PROVIDER", "IPFS_ACCELERATE_PY_LLM_PROVIDER", "echo"),
        ("ACCELMESH_MODEL", "IPFS_ACCELERATE_PY_LLM_MODEL", "tiny"),
        ("ACCELMESH_PROVIDER_CACHE", "IPFS_ACCELERATE_PY_ROUTER_CACHE", "0"),
        ("ACCELMESH_RESPONSE_CACHE", "IPFS_ACCELERATE_PY_ROUTER_RESPONSE_CACHE", "0"),
        ("ACCELMESH_CACHE_KEY", "IPFS_ACCELERATE_PY_ROUTER_CACHE_KEY", "sha256"),
        ("ACCELMESH_ENABLE_MESH", "IPFS_ACCELERATE_PY_ENABLE_BACKEND_MANAGER", "1"),
        ("ACCELMESH_LOAD_BALANCING", "IPFS_ACCELERATE_PY_LLM_LOAD_BALANCING", "least_loaded"),
    ],
)
def test_every_seed_alias_is_read_and_the_primary_wins(primary, alias, value):
    via_alias = load_settings(env={alias: value})
    via_primary = load_settings(env={primary: value})
    assert via_alias == via_primary
    assert via_alias != load_settings(env={}), f"{alias} changed nothing"
    assert via_alias.sources[next(s.dotted for s in iter_specs() if s.env == primary)] == f"env {alias}"


def test_primary_beats_alias_and_a_conflict_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="node.config"):
        s = load_settings(env={"ACCELMESH_MODEL": "a", "IPFS_ACCELERATE_PY_LLM_MODEL": "b"})
    assert s.model == "a"
    assert "ACCELMESH_MODEL" in caplog.text and "IPFS_ACCELERATE_PY_LLM_MODEL" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="node.config"):
        load_settings(env={"ACCELMESH_MODEL": "a", "IPFS_ACCELERATE_PY_LLM_MODEL": "a"})
    assert caplog.text == "", "equal values are not a conflict"


def test_unknown_load_balancing_strategy_is_refused_with_the_valid_names():
    with pytest.raises(ConfigError) as info:
        load_settings(env={"IPFS_ACCELERATE_PY_LLM_LOAD_BALANCING": "fastest"})
    message = str(info.value)
    assert "load_balancing" in message and "'fastest'" in message
    for name in LOAD_BALANCING_STRATEGIES:
        assert name in message


def test_every_valid_load_balancing_strategy_loads():
    for name in LOAD_BALANCING_STRATEGIES:
        assert load_settings(env={"ACCELMESH_LOAD_BALANCING": name}).load_balancing == name


def test_unknown_toml_key_lists_the_valid_ones(tmp_path):
    toml = write_toml(tmp_path, "[echo]\nlatncy_ms = 5\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config=toml, env={})
    assert "echo.latncy_ms" in str(info.value) and "latency_ms" in str(info.value)


def test_invalid_toml_and_missing_file_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(config=write_toml(tmp_path, "model = \n"), env={})
    with pytest.raises(ConfigError, match="file not found"):
        load_settings(config=tmp_path / "nope.toml", env={})


@pytest.mark.parametrize(
    "env,match",
    [
        ({"ACCELMESH_ECHO_FAILURE_RATE": "1.5"}, "at most 1"),
        ({"ACCELMESH_ECHO_CONCURRENCY": "-1"}, "at least 0"),
        ({"ACCELMESH_ECHO_LATENCY_MS": "20-10"}, "MIN <= MAX"),
        ({"ACCELMESH_ECHO_SEED": "abc"}, "integer"),
        ({"ACCELMESH_REQUEST_TIMEOUT": "0"}, "at least"),
        ({"ACCELMESH_CACHE_KEY": "md5"}, "cid, sha256"),
    ],
)
def test_bad_values_are_refused_with_a_reason(env, match):
    with pytest.raises(ConfigError, match=match):
        load_settings(env=env)


def test_latency_accepts_a_number_or_a_range(tmp_path):
    assert load_settings(env={"ACCELMESH_ECHO_LATENCY_MS": "7"}).echo.latency_ms == (7.0, 7.0)
    assert load_settings(env={"ACCELMESH_ECHO_LATENCY_MS": "5-20"}).echo.latency_ms == (5.0, 20.0)
    toml = write_toml(tmp_path, "[echo]\nlatency_ms = 3\n")
    assert load_settings(config=toml, env={}).echo.latency_ms == (3.0, 3.0)


def test_data_dir_defaults_to_xdg_then_home():
    assert load_settings(env={"XDG_DATA_HOME": "/x", "HOME": "/h"}).data_dir == "/x/accelmesh"
    assert load_settings(env={"HOME": "/h"}).data_dir == "/h/.local/share/accelmesh"
    assert load_settings(env={"XDG_DATA_HOME": "", "HOME": "/h"}).data_dir == "/h/.local/share/accelmesh"
    assert load_settings(env={"ACCELMESH_DATA_DIR": "/d", "HOME": "/h"}).data_dir == "/d"


@pytest.mark.parametrize(
    "given",
    [
        ["echo,hf_local"],
        ["echo", "hf_local"],
        ["echo, hf_local,"],
        ["echo", ",hf_local"],
        "echo,hf_local",
    ],
    ids=["one-comma-list", "repeated", "spaces-and-trailing-comma", "repeated-with-empty-item", "plain-string"],
)
def test_list_flags_are_split_on_commas_and_may_repeat(given):
    s = load_settings(env={}, flags={"fallback_order": given})
    assert s.fallback_order == ("echo", "hf_local")
    assert s.sources["fallback_order"] == "flag --fallback-order"


def test_list_flags_as_the_cli_parses_them():
    from node.cli import _setting_flags, build_parser

    args = build_parser().parse_args(
        ["providers", "--fallback-order", "echo,hf_local", "--fallback-order", "openrouter",
         "--providers-hf-local-models", "a, b"]
    )
    s = load_settings(env={}, flags=_setting_flags(args))
    assert s.fallback_order == ("echo", "hf_local", "openrouter")
    assert s.providers.hf_local.models == ("a", "b")


def test_toml_arrays_keep_their_items_as_written(tmp_path):
    toml = write_toml(tmp_path, '[providers.hf_local]\nmodels = ["/srv/models/a,b", "c"]\n')
    assert load_settings(config=toml, env={}).providers.hf_local.models == ("/srv/models/a,b", "c")


def test_alias_with_the_same_meaning_is_not_a_conflict(caplog):
    with caplog.at_level(logging.WARNING, logger="node.config"):
        s = load_settings(env={"ACCELMESH_PROVIDER_CACHE": "1", "IPFS_ACCELERATE_PY_ROUTER_CACHE": "true"})
    assert s.provider_cache is True and caplog.text == "", "1 and true mean the same"
    with caplog.at_level(logging.WARNING, logger="node.config"):
        s = load_settings(env={"ACCELMESH_PROVIDER_CACHE": "on", "IPFS_ACCELERATE_PY_ROUTER_CACHE": "off"})
    assert s.provider_cache is True
    assert "ACCELMESH_PROVIDER_CACHE" in caplog.text and "IPFS_ACCELERATE_PY_ROUTER_CACHE" in caplog.text


def test_docs_configuration_lists_every_setting_as_generated():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    match = re.search(r"<!-- settings:begin -->\n(.*?)<!-- settings:end -->", doc, re.S)
    assert match, "docs/configuration.md lacks the generated settings table"
    assert match.group(1) == render_reference(), (
        "docs/configuration.md is stale: regenerate with `python -m node.config --markdown`"
    )


def test_tests_run_without_any_inherited_setting_or_alias():
    from tests.conftest import _is_config_name

    for spec in iter_specs():
        assert _is_config_name(spec.env), spec.env
        assert spec.alias is None or _is_config_name(spec.alias), spec.alias
    assert _is_config_name("OPENROUTER_API_KEY")
    leaked = [name for name in os.environ if _is_config_name(name)]
    assert leaked == [], f"the clean_environment fixture let {leaked} through"


def test_mesh_pool_limits_from_toml_env_and_flag(tmp_path):
    from node.cli import _setting_flags, build_parser

    s = load_settings(env={})
    assert (s.mesh.pool_max_idle_per_peer, s.mesh.pool_max_idle_seconds) == (16, 20.0)
    toml = write_toml(tmp_path, "[mesh]\npool_max_idle_per_peer = 4\npool_max_idle_seconds = 5\n")
    s = load_settings(config=toml, env={})
    assert (s.mesh.pool_max_idle_per_peer, s.mesh.pool_max_idle_seconds) == (4, 5.0)
    s = load_settings(config=toml, env={"ACCELMESH_MESH_POOL_MAX_IDLE_PER_PEER": "0",
                                        "ACCELMESH_MESH_POOL_MAX_IDLE_SECONDS": "7.5"})
    assert (s.mesh.pool_max_idle_per_peer, s.mesh.pool_max_idle_seconds) == (0, 7.5), "0: keep no idle stream"
    assert s.sources["mesh.pool_max_idle_per_peer"] == "env ACCELMESH_MESH_POOL_MAX_IDLE_PER_PEER"
    args = build_parser().parse_args(["daemon", "--mesh-pool-max-idle-per-peer", "2",
                                      "--mesh-pool-max-idle-seconds", "0.5"])
    s = load_settings(config=toml, env={"ACCELMESH_MESH_POOL_MAX_IDLE_PER_PEER": "0"}, flags=_setting_flags(args))
    assert (s.mesh.pool_max_idle_per_peer, s.mesh.pool_max_idle_seconds) == (2, 0.5)
    assert s.sources["mesh.pool_max_idle_seconds"] == "flag --mesh-pool-max-idle-seconds"


@pytest.mark.parametrize(
    "name,raw,reason",
    [
        ("ACCELMESH_MESH_POOL_MAX_IDLE_PER_PEER", "-1", "at least 0"),
        ("ACCELMESH_MESH_POOL_MAX_IDLE_PER_PEER", "many", "integer"),
        ("ACCELMESH_MESH_POOL_MAX_IDLE_SECONDS", "0", "at least 0.001"),
        ("ACCELMESH_MESH_POOL_MAX_IDLE_SECONDS", "soon", "number"),
    ],
)
def test_bad_mesh_pool_limit_names_the_key_value_and_source(name, raw, reason):
    key = "mesh." + name.removeprefix("ACCELMESH_MESH_").lower()
    with pytest.raises(ConfigError) as info:
        load_settings(env={name: raw})
    message = str(info.value)
    assert key in message and repr(raw) in message and name in message and reason in message
    with pytest.raises(ConfigError, match=f"{key}.*flag --{key.replace('.', '-').replace('_', '-')}"):
        load_settings(env={}, flags={key: raw})
