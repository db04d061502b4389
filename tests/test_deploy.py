"""deploy/: the systemd unit verifies, and the example config lists every setting and loads."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from node.config import iter_specs, load_settings, render_example_toml

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "systemd" / "accelmesh.service"
EXAMPLE = ROOT / "deploy" / "accelmesh.toml"


def test_example_config_is_generated_from_the_settings():
    assert EXAMPLE.read_text() == render_example_toml(), "regenerate: python -m node.config --toml"


def test_example_config_names_every_setting_and_loads_when_uncommented(tmp_path):
    text = EXAMPLE.read_text()
    for spec in iter_specs():
        assert f"# {spec.key} = " in text, spec.dotted
    uncommented = "\n".join(line[2:] if line.startswith("# ") else line for line in text.splitlines())
    path = tmp_path / "all.toml"
    path.write_text(uncommented)
    loaded = load_settings(config=path, env={})
    defaults = load_settings(env={"ACCELMESH_DATA_DIR": "/var/lib/accelmesh"})
    assert loaded == defaults and loaded.data_dir == "/var/lib/accelmesh"


def test_systemd_unit_is_hardened():
    unit = UNIT.read_text()
    for line in ("User=accelmesh", "NoNewPrivileges=yes", "ProtectSystem=strict", "StateDirectory=accelmesh",
                 "Restart=on-failure", "KillSignal=SIGTERM", "CapabilityBoundingSet="):
        assert f"\n{line}" in unit, line


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    # `make test` installs systemd (SYSTEM_PACKAGES): a machine without it fails, never skips, the check
    assert analyze is not None, "systemd-analyze not installed: `make system-packages` or `apt-get install systemd`"
    unit = tmp_path / "accelmesh.service"
    # verify checks that ExecStart exists: point it at this checkout's venv
    unit.write_text(UNIT.read_text().replace("/opt/accelmesh/.venv/bin/accelmesh",
                                             str(Path(sys.executable).parent / "accelmesh")))
    out = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr
