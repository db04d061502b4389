"""`make demo`: three daemons, prompts through one, answers from all three, a clean stop."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.system


def test_the_demo_serves_from_every_node_and_stops_cleanly(subprocess_env):
    proc = subprocess.run([sys.executable, "-m", "node.demo"], capture_output=True, text=True,
                          env=subprocess_env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    served = re.findall(r"served by (alpha|beta|gamma) \(echo", out)
    assert set(served) == {"alpha", "beta", "gamma"} and len(served) == 8, out  # computed: 8 prompts
    repeated = out.split("[via alpha, repeated]")[1].splitlines()[1]
    assert "served by alpha (mesh, cache memory" in repeated, "the repeat is answered at alpha, no node asked"
    on_gamma = out.split("[via alpha, on gamma]")[1].splitlines()[1]
    assert "served by gamma" in on_gamma
    assert "stopped all daemons (exit codes [0, 0, 0])" in out
