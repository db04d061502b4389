"""The `accelmesh` command line, run as a real subprocess."""

import json
import subprocess
from pathlib import Path

import pytest

RESULT_KEYS = {"text", "provider", "model", "cache", "key", "cid", "request_id", "peer", "served_from", "agreed",
               "latency_ms"}


@pytest.fixture
def accelmesh(subprocess_env):
    def run(*args, stdin=None, check=True):
        proc = subprocess.run(["accelmesh", *args], input=stdin, capture_output=True, text=True,
                              env=subprocess_env, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"accelmesh {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
        return proc

    return run


def test_generate_json_prints_exactly_one_object_with_the_contract_keys(accelmesh):
    out = accelmesh("generate", "hello", "--provider", "echo", "--json")
    result = json.loads(out.stdout)
    assert set(result) == RESULT_KEYS
    assert result["text"] == "echo: hello" and result["provider"] == "echo" and result["cache"] == "miss"
    assert result["peer"] is None and result["served_from"] is None
    assert result["key"].startswith("bafkrei") and result["cid"].startswith("bafkrei")


def test_generate_reads_the_prompt_from_stdin(accelmesh):
    out = accelmesh("generate", "-", "--provider", "echo", stdin="from stdin\n")
    assert out.stdout == "echo: from stdin\n"


def test_generate_stream_json_prints_deltas_then_the_final_object(accelmesh):
    out = accelmesh("generate", "a b c", "--provider", "echo", "--stream", "--json")
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert lines[:-1] == [{"delta": "echo:"}, {"delta": " a"}, {"delta": " b"}, {"delta": " c"}]
    assert set(lines[-1]) == RESULT_KEYS and lines[-1]["text"] == "echo: a b c"


def test_generate_stream_prints_text_as_it_comes(accelmesh):
    assert accelmesh("generate", "a b", "--provider", "echo", "--stream").stdout == "echo: a b\n"


def test_global_flags_work_before_and_after_the_subcommand(accelmesh, tmp_path):
    before = accelmesh("--log-level", "debug", "--data-dir", str(tmp_path / "d1"), "generate", "x",
                       "--provider", "echo", "--json")
    after = accelmesh("generate", "x", "--provider", "echo", "--json", "--log-format", "json",
                      "--data-dir", str(tmp_path / "d2"))
    assert json.loads(before.stdout)["text"] == json.loads(after.stdout)["text"] == "echo: x"
    assert (tmp_path / "d1" / "cache.sqlite").exists() and (tmp_path / "d2" / "cache.sqlite").exists()


def test_data_dir_store_makes_the_second_run_a_local_hit(accelmesh, tmp_path):
    args = ("generate", "remember me", "--provider", "echo", "--json", "--data-dir", str(tmp_path))
    first, second = (json.loads(accelmesh(*args).stdout) for _ in range(2))
    assert (first["cache"], second["cache"]) == ("miss", "local") and first["cid"] == second["cid"]


def test_generate_without_data_dir_writes_nothing_to_disk(accelmesh, subprocess_env):
    accelmesh("generate", "x", "--provider", "echo")
    assert not Path(subprocess_env["XDG_DATA_HOME"]).exists()


def test_cache_flags(accelmesh, tmp_path):
    base = ("generate", "x", "--provider", "echo", "--json", "--data-dir", str(tmp_path))
    accelmesh(*base)
    assert json.loads(accelmesh(*base, "--no-cache").stdout)["cache"] == "bypass"
    assert json.loads(accelmesh(*base, "--cache", "only-if-cached").stdout)["cache"] == "local"
    miss = accelmesh("generate", "y", "--provider", "echo", "--cache", "only-if-cached", check=False)
    assert miss.returncode == 1 and "only-if-cached" in miss.stderr


def test_setting_flags_follow_the_mapping_rule(accelmesh):
    out = accelmesh("generate", "x", "--provider", "echo", "--echo-failure-rate", "1", check=False)
    assert out.returncode == 1 and "injected failure" in out.stderr


def test_providers_json_shape(accelmesh):
    listing = json.loads(accelmesh("providers", "--json").stdout)
    echo = next(p for p in listing["providers"] if p["name"] == "echo")
    assert set(echo) == {"name", "ready", "reason", "models"} and echo["ready"] is True
    assert echo["models"] == ["echo"]


def test_providers_table(accelmesh):
    out = accelmesh("providers").stdout
    assert out.splitlines()[0].split()[:3] == ["NAME", "READY", "MODELS"] and "echo" in out


def test_version(accelmesh):
    assert accelmesh("--version").stdout.strip() == "accelmesh 0.1.0"


def test_errors_are_one_line_on_stderr_with_a_nonzero_exit(accelmesh):
    out = accelmesh("generate", "x", "--provider", "nope", check=False)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("accelmesh: error: nope: no such provider")


def test_bad_setting_exits_2_for_every_command(accelmesh, subprocess_env):
    subprocess_env["ACCELMESH_LOAD_BALANCING"] = "fastest"
    for args in (("providers",), ("generate", "x", "--provider", "echo")):
        out = accelmesh(*args, check=False)
        assert out.returncode == 2 and "load_balancing='fastest'" in out.stderr and "round_robin" in out.stderr


def test_an_unknown_strategy_is_refused_naming_the_valid_ones(accelmesh):
    out = accelmesh("generate", "x", "--provider", "echo", "--strategy", "fastest", check=False)
    assert out.returncode == 2 and "fastest" in out.stderr and "power_of_two" in out.stderr
    out = accelmesh("generate", "x", "--provider", "echo", "--strategy", "power_of_two", "--json")
    assert json.loads(out.stdout)["text"] == "echo: x", "in-process: no mesh to balance, the strategy is harmless"


def test_debug_shows_the_traceback(accelmesh):
    out = accelmesh("generate", "x", "--provider", "nope", "--debug", check=False)
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_data_dir_and_peer_are_alternatives(accelmesh, tmp_path):
    out = accelmesh("generate", "x", "--data-dir", str(tmp_path), "--peer", "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWx",
                    check=False)
    assert out.returncode == 2 and "--data-dir and --peer are alternatives" in out.stderr
    assert list(tmp_path.iterdir()) == [], "nothing was dialed or written"


def test_keygen_into_a_directory_that_is_not_there_is_one_error_line(accelmesh, tmp_path):
    out = accelmesh("keygen", "--cluster-key", str(tmp_path / "missing" / "swarm.key"), check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"cannot write {tmp_path / 'missing' / 'swarm.key'}: No such file or directory" in out.stderr
