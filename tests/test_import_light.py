"""`import node` and `import protocols` stay light: no torch, transformers or libp2p, no I/O."""

import subprocess
import sys

HEAVY = ("torch", "transformers", "libp2p", "sentence_transformers", "trio")


def test_import_node_and_protocols_leaves_heavy_modules_out():
    code = (
        "import sys, node, protocols\n"
        "import node.config, node.errors\n"
        f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == ""


def test_public_api_names_resolve_without_heavy_imports():
    code = (
        "import sys, node\n"
        "names = ['generate_text', 'agenerate_text', 'stream_text', 'astream_text', 'register_llm_provider',\n"
        "         'get_llm_provider', 'list_llm_providers', 'describe_llm_providers', 'clear_llm_router_caches',\n"
        "         'RouterDeps', 'get_default_router_deps', 'set_default_router_deps']\n"
        "assert all(callable(getattr(node, n)) for n in names)\n"
        "print(' '.join(m for m in ('torch', 'transformers', 'libp2p') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == ""


def test_the_http_client_imports_no_network_stack_and_no_server():
    """`accelmesh generate` through a daemon's HTTP API starts fast: the client and the CLI's path to
    it import neither libp2p nor the server (Hypercorn, Starlette), nor httpx, trio or cryptography."""
    code = (
        "import sys\n"
        "import node.cli, node.http.client, node.datadir\n"
        "print(' '.join(m for m in (*" + repr(HEAVY) + ", 'hypercorn', 'starlette', 'httpx', 'cryptography')\n"
        "               if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == ""
