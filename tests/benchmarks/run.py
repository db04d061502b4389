"""`make bench`: run the benchmarks, keep raw samples, and rewrite docs/performance.md.

    python -m tests.benchmarks.run            # every benchmark
    python -m tests.benchmarks.run router     # only tests/benchmarks/bench_router.py

Each `bench_<name>.py` defines `TITLE` and `run() -> Section`. Raw samples go to
tests/benchmarks/results/<name>.jsonl (one JSON object per line; a run of thousands of
timings is one line holding every sample, see `series()`); docs/performance.md keeps one
block per benchmark, so running one benchmark leaves the others' results in place.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "tests" / "benchmarks" / "results"
DOC = ROOT / "docs" / "performance.md"
HEADER = """# Performance

Written by `make bench` (`python -m tests.benchmarks.run`); do not edit by hand. Each block
says when, on what and how it was measured; the raw samples are in `tests/benchmarks/results/`
(`<name>.jsonl`: one object per measurement, or per series of timings with every sample in it).
Targets live here, not in timed tests.
"""


@dataclass
class Section:
    markdown: str  # the block's body: tables and a sentence on what was measured
    samples: list[dict[str, Any]] = field(default_factory=list)  # raw samples for the .jsonl file
    sample_count: int = 0


def series(labels: dict[str, Any], values: list[float], unit: str = "ms") -> list[dict[str, Any]]:
    """One .jsonl line for a run of many timings: its labels, the unit, and every sample in order."""
    return [{**labels, "unit": unit, "count": len(values), "samples": [float(f"{v:.4g}") for v in values]}]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "p99": percentile(values, 0.99), "n": len(values)}


def machine() -> str:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)docs/performance.md", ":(exclude)tests/benchmarks/results"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()  # our own output aside
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "unknown", ""
    return (
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, commit {commit}"
        f"{' (with uncommitted changes)' if dirty else ''}, nproc {os.cpu_count()}, {cpu}, "
        f"Python {platform.python_version()}"
    )


def available() -> list[str]:
    return sorted(p.stem[len("bench_"):] for p in Path(__file__).parent.glob("bench_*.py"))


def write_block(name: str, title: str, section: Section, command: str) -> None:
    begin, end = f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"
    block = (
        f"{begin}\n## {title}\n\n_Measured {machine()}; command `{command}`; "
        f"{section.sample_count} samples._\n\n{section.markdown.strip()}\n{end}"
    )
    text = DOC.read_text() if DOC.exists() else HEADER
    first = text.find("<!-- bench:")
    text = HEADER + "\n" + text[first:] if first >= 0 else HEADER  # the header is rewritten every run
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(text)


def main(argv: list[str]) -> int:
    names = argv or available()
    unknown = set(names) - set(available())
    if unknown:
        print(f"unknown benchmark(s): {', '.join(sorted(unknown))}; available: {', '.join(available())}")
        return 2
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in names:
        module = importlib.import_module(f"tests.benchmarks.bench_{name}")
        print(f"== {name}: {module.TITLE}", flush=True)
        section: Section = module.run()
        with open(RESULTS / f"{name}.jsonl", "w") as fh:
            for sample in section.samples:
                fh.write(json.dumps(sample) + "\n")
        write_block(name, module.TITLE, section, f"python -m tests.benchmarks.run {name}")
        print(section.markdown.strip(), flush=True)
    print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
