"""deploy/docker: both Dockerfiles pass hadolint, pin the Makefile's torch, build multi-stage images that
run as a non-root user with the data dir as a volume, and their HEALTHCHECK works against a daemon."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from tests.deploy._tools import DEPLOY, ROOT, daemon_flags_in, makefile_variable, markdown_code, run, tool

DOCKERFILES = {"cpu": DEPLOY / "docker" / "Dockerfile.cpu", "cuda": DEPLOY / "docker" / "Dockerfile.cuda"}
CLUSTER_SCRIPT = DEPLOY / "docker" / "cluster.sh"
COMPILERS = ("build-essential", "gcc", "g++", "-dev ", "-dev\n", "python3.11-dev")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.MULTILINE)]


def stages(path: Path) -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for instruction in instructions(path):
        if instruction[0] == "FROM":
            out.append([])
        if out:
            out[-1].append(instruction)
    return out


def arg_default(path: Path, name: str) -> str:
    (value,) = [args.split("=", 1)[1] for kind, args in instructions(path) if kind == "ARG" and args.startswith(f"{name}=")]
    return value


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_dockerfile_passes_hadolint(flavour):
    out = run([tool("hadolint"), "--no-color", str(DOCKERFILES[flavour])])
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_fails_a_dockerfile_it_should(tmp_path):
    """The checker is strict enough to matter: an unpinned image and apt call fail it."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get install curl\n")
    out = run([tool("hadolint"), "--no-color", str(bad)])
    assert out.returncode != 0 and "DL3006" in out.stdout and "DL3014" in out.stdout, out.stdout


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_torch_pin_is_the_makefiles(flavour):
    pin = makefile_variable("TORCH_PIN")
    assert pin == f"torch=={arg_default(DOCKERFILES[flavour], 'TORCH_VERSION')}"
    assert f'"{pin}"' in (ROOT / "pyproject.toml").read_text(), "pyproject's hf extra pins another torch"


def test_cpu_image_takes_torch_from_the_cpu_wheel_index():
    path = DOCKERFILES["cpu"]
    assert arg_default(path, "TORCH_INDEX_URL") == "https://download.pytorch.org/whl/cpu"
    assert "torch.version.cuda is None" in path.read_text()  # the build fails on a CUDA wheel


def test_cuda_image_base_is_an_official_cuda_runtime_matching_torchs_cuda_build():
    path = DOCKERFILES["cuda"]
    base = arg_default(path, "CUDA_IMAGE")
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-runtime-ubuntu\d+\.\d+", base)
    assert match, base
    torch_cuda = arg_default(path, "TORCH_CUDA")
    assert torch_cuda == f"cu{match.group(1)}{match.group(2)}", (base, torch_cuda)
    assert arg_default(path, "TORCH_INDEX_URL") == "https://download.pytorch.org/whl/${TORCH_CUDA}"


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_image_is_multi_stage_without_a_compiler_non_root_with_the_data_dir_a_volume(flavour):
    *build, final = stages(DOCKERFILES[flavour])
    assert build and any("build-essential" in args for kind, args in build[0] if kind == "RUN")
    final_text = "\n".join(f"{kind} {args}" for kind, args in final)
    assert not [c for c in COMPILERS if c in final_text + "\n"], final_text
    assert ("COPY", "--from=build /opt/accelmesh /opt/accelmesh") in final
    users = [args for kind, args in final if kind == "USER"]
    assert users == ["10001:10001"], users  # numeric: Kubernetes' runAsNonRoot can check it
    assert ("VOLUME", '["/var/lib/accelmesh"]') in final
    env = " ".join(args for kind, args in final if kind == "ENV")
    assert "ACCELMESH_DATA_DIR=/var/lib/accelmesh" in env
    assert ("ENTRYPOINT", '["accelmesh"]') in final
    (healthcheck,) = [args for kind, args in final if kind == "HEALTHCHECK"]
    assert "/healthz" in healthcheck


def healthcheck_command(path: Path) -> list[str]:
    (args,) = [args for kind, args in instructions(path) if kind == "HEALTHCHECK"]
    return json.loads(args.split(" CMD ", 1)[1])


@pytest.mark.system
def test_healthcheck_is_healthy_while_the_daemon_serves_http_and_unhealthy_once_it_stopped(start_daemon, subprocess_env):
    commands = {flavour: healthcheck_command(path) for flavour, path in DOCKERFILES.items()}
    assert commands["cpu"] == commands["cuda"]
    program, flag, code = commands["cpu"]
    assert (program, flag) == ("python3", "-c")
    with start_daemon("alice", "--http", "127.0.0.1:0") as alice:
        env = {**subprocess_env, "ACCELMESH_DATA_DIR": str(alice.data_dir)}
        healthy = run([sys.executable, "-c", code], env=env, timeout=30)
        assert healthy.returncode == 0, healthy.stderr
    unhealthy = run([sys.executable, "-c", code], env=env, timeout=30)
    assert unhealthy.returncode != 0  # daemon.json is gone


def test_build_context_holds_what_the_dockerfiles_copy_and_not_the_venv():
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") - 1].startswith("#") and "*" in ignore  # everything out, then back in
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for path in DOCKERFILES.values():
        for kind, args in instructions(path):
            if kind == "COPY" and not args.startswith("--from"):
                *sources, _ = args.split()
                for source in sources:
                    assert source.rstrip("/") in allowed, f"{path.name}: COPY {source} is excluded by .dockerignore"
                    assert (ROOT / source).exists(), source


def test_cluster_script_passes_shellcheck():
    out = run([tool("shellcheck"), str(CLUSTER_SCRIPT)])
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_daemon_flag_in_deploy_files_exists(accelmesh_cmd):
    """Every `--flag` given to `accelmesh daemon` in deploy/, the docs' operations guide and the
    cluster script is one `accelmesh daemon --help` lists."""
    help_text = accelmesh_cmd("daemon", "--help", check=True).stdout
    known = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", help_text))
    files = [*DOCKERFILES.values(), CLUSTER_SCRIPT, DEPLOY / "systemd" / "accelmesh.service",
             DEPLOY / "compose" / "compose.yaml", DEPLOY / "kubernetes" / "daemonset.yaml",
             ROOT / "docs" / "operations.md", DEPLOY / "README.md"]
    used = {(path.name, flag) for path in files
            for flag in daemon_flags_in(markdown_code(path.read_text()) if path.suffix == ".md" else path.read_text())}
    assert {flag for _, flag in used} >= {"--listen", "--http", "--cluster-key", "--data-dir", "--log-format"}, used
    unknown = sorted((name, flag) for name, flag in used if flag not in known)
    assert unknown == [], unknown


def test_the_flag_scan_finds_flags_in_shell_lines_exec_arrays_and_continuations():
    text = ('ExecStart=/x/accelmesh daemon --config /c --data-dir /d\n'
            'CMD ["daemon", "--listen", "/ip4/0.0.0.0/tcp/4001"]\n'
            '  "$IMAGE" daemon --http 127.0.0.1:1 \\\n    --cluster-key /k "$@"\n'
            'docker run --rm image keygen --cluster-key /out\n'
            'the daemon logs at info unless --log-level says otherwise\n')
    assert list(daemon_flags_in(text)) == ["--config", "--data-dir", "--listen", "--http", "--cluster-key"]
    prose = "Run `accelmesh daemon --http HOST:PORT` (the daemon's --open flag)\n```sh\naccelmesh daemon --mdns\n```\n"
    assert sorted(daemon_flags_in(markdown_code(prose))) == ["--http", "--mdns"]
