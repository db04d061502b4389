"""protocols/ is sans-I/O: it never imports trio or libp2p, and never catches everything."""

import ast
import subprocess
import sys
from pathlib import Path

PROTOCOLS = Path(__file__).resolve().parents[2] / "protocols"


def test_importing_every_protocols_module_pulls_in_no_trio_nor_libp2p():
    modules = sorted(
        ".".join(p.relative_to(PROTOCOLS.parent).with_suffix("").parts)
        for p in PROTOCOLS.rglob("*.py")
    )
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m.removesuffix('.__init__'))\n"
        "print(' '.join(m for m in ('trio', 'libp2p', 'node', 'torch', 'httpx') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "", f"protocols imported: {out.stdout.strip()}"
    assert len(modules) >= 5


def broad_handlers(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ExceptHandler):
            names = []
            if node.type is None:
                names = ["<bare except>"]
            else:
                types = node.type.elts if isinstance(node.type, ast.Tuple) else [node.type]
                names = [ast.unparse(t) for t in types if ast.unparse(t) in ("Exception", "BaseException")]
            found += [f"{path.name}:{node.lineno}: {n}" for n in names]
    return found


def test_no_protocols_module_catches_exception_baseexception_or_everything():
    offenders = [line for p in sorted(PROTOCOLS.rglob("*.py")) for line in broad_handlers(p)]
    assert offenders == [], "decoders must catch only what they can raise:\n" + "\n".join(offenders)


def test_the_scan_itself_finds_broad_handlers(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("try:\n    pass\nexcept:\n    pass\ntry:\n    pass\nexcept (ValueError, Exception):\n    pass\n")
    assert len(broad_handlers(sample)) == 2
