"""deploy/systemd: the unit with its GPU drop-in passes `systemd-analyze verify`, the drop-in opens the
GPU devices only, and the journald drop-in sets rotation with keys systemd-journald parses."""

from __future__ import annotations

import configparser
import re
import sys
from pathlib import Path

from tests.deploy._tools import DEPLOY, run, tool

SYSTEMD = DEPLOY / "systemd"
UNIT = SYSTEMD / "accelmesh.service"
GPU_DROP_IN = SYSTEMD / "accelmesh.service.d" / "gpu.conf"
JOURNALD_DROP_IN = SYSTEMD / "journald.conf.d" / "accelmesh.conf"
JOURNALD_BINARIES = ("/lib/systemd/systemd-journald", "/usr/lib/systemd/systemd-journald")


def unit_tree(tmp_path: Path, drop_in_text: str | None = None) -> Path:
    """The unit, with ExecStart pointed at this venv (verify checks that it exists), and the GPU
    drop-in beside it in accelmesh.service.d/, where `systemd-analyze verify` reads drop-ins."""
    unit = tmp_path / "accelmesh.service"
    unit.write_text(UNIT.read_text().replace("/opt/accelmesh/.venv/bin/accelmesh",
                                             str(Path(sys.executable).parent / "accelmesh")))
    (tmp_path / "accelmesh.service.d").mkdir()
    (tmp_path / "accelmesh.service.d" / "gpu.conf").write_text(drop_in_text or GPU_DROP_IN.read_text())
    return unit


def test_unit_with_the_gpu_drop_in_passes_systemd_analyze_verify(tmp_path):
    out = run([tool("systemd-analyze"), "verify", str(unit_tree(tmp_path))], timeout=60)
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr


def test_verify_reads_the_drop_in(tmp_path):
    """The check above covers the drop-in: a wrong key in it is reported."""
    unit = unit_tree(tmp_path, GPU_DROP_IN.read_text().replace("DevicePolicy=closed", "DevicePolicee=closed"))
    out = run([tool("systemd-analyze"), "verify", str(unit)], timeout=60)
    assert "gpu.conf" in out.stderr and "DevicePolicee" in out.stderr, out.stderr


def settings(path: Path) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # keys are case-sensitive
    parser.read_string(path.read_text())
    return parser


def test_the_unit_keeps_devices_private_and_the_gpu_drop_in_opens_only_gpu_devices():
    unit = UNIT.read_text()
    assert "\nPrivateDevices=yes\n" in unit
    drop_in = GPU_DROP_IN.read_text()
    lines = [line for line in drop_in.splitlines() if line and not line.startswith("#")]
    assert "PrivateDevices=no" in lines and "DevicePolicy=closed" in lines
    allowed = [line.split("=", 1)[1] for line in lines if line.startswith("DeviceAllow=")]
    assert allowed and all(re.fullmatch(r"char-nvidia-[a-z]+ rw?", entry) for entry in allowed), allowed
    assert {"char-nvidia-frontend rw", "char-nvidia-uvm rw"} <= set(allowed)
    assert "SupplementaryGroups=video render" in lines
    assert "Environment=ACCELMESH_PROVIDERS_HF_LOCAL_DEVICE=cuda" in lines


def test_the_unit_logs_to_the_journal_with_a_raised_rate_limit():
    service = dict(settings(UNIT)["Service"])
    assert service["StandardError"] == "journal" and service["SyslogIdentifier"] == "accelmesh"
    assert service["LogRateLimitIntervalSec"] == "30s" and int(service["LogRateLimitBurst"]) > 10000
    assert "--log-format json" in service["ExecStart"]


def journald_keys() -> set[str]:
    """The [Journal] keys systemd-journald parses: its gperf table's `Journal.Key` names."""
    binary = next((path for path in JOURNALD_BINARIES if Path(path).exists()), None)
    assert binary, f"systemd-journald not found in {JOURNALD_BINARIES}; it comes with the systemd package"
    return set(re.findall(rb"Journal\.([A-Z][A-Za-z]+)", Path(binary).read_bytes()))


def test_journald_drop_in_uses_keys_journald_parses_with_valid_sizes_and_times():
    known = {key.decode() for key in journald_keys()}
    assert {"SystemMaxUse", "MaxRetentionSec", "RateLimitBurst"} <= known, sorted(known)
    parser = settings(JOURNALD_DROP_IN)
    assert parser.sections() == ["Journal"]
    journal = dict(parser["Journal"])
    assert set(journal) <= known, sorted(set(journal) - known)
    for key in ("SystemMaxUse", "SystemKeepFree", "SystemMaxFileSize"):
        assert re.fullmatch(r"\d+[KMGT]", journal[key]), (key, journal[key])
    for key in ("MaxRetentionSec", "MaxFileSec"):
        assert re.fullmatch(r"\d+(s|min|h|day|week|month|year)", journal[key]), (key, journal[key])
    assert journal["Storage"] == "persistent" and journal["Compress"] == "yes"
