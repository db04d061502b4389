"""Who may use the HTTP API: anyone on loopback; beyond it, a bearer token (unless --open).

Tokens are compared in constant time (`hmac.compare_digest`, against every token, so the time
taken does not say which one came close). The daemon writes a local token to `http.token` in its
data dir (mode 0600) for the local CLI and `node.connect(data_dir=)`.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TOKEN_FILE", "BearerAuth", "api_keys", "is_loopback_host", "write_token"]

TOKEN_FILE = "http.token"
TOKEN_BYTES = 32  # 256 bits of randomness, url-safe base64
MIN_KEY_CHARS = 16  # a configured API key shorter than this is refused at start


def is_loopback_host(host: str) -> bool:
    """Whether `host` (an HTTP bind address) is loopback only; `0.0.0.0`, `::` and names are not."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class BearerAuth:
    """`required`: requests must carry `Authorization: Bearer <one of tokens>`."""

    tokens: frozenset[str]
    required: bool

    def allows(self, authorization: str | None) -> bool:
        if not self.required:
            return True
        if not authorization or authorization[:7].lower() != "bearer ":
            return False
        offered = authorization[7:].strip().encode()
        matched = False
        for token in self.tokens:  # every token, whatever matched: no early exit
            matched |= hmac.compare_digest(offered, token.encode())
        return matched

    def __repr__(self) -> str:
        return f"<BearerAuth required={self.required} tokens={len(self.tokens)}>"


def write_token(data_dir: Path) -> str:
    """A fresh local token in `data_dir/http.token` (mode 0600, replaced atomically); returns it."""
    token = secrets.token_urlsafe(TOKEN_BYTES)
    path = data_dir / TOKEN_FILE
    tmp = data_dir / f".{TOKEN_FILE}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return token


def api_keys(keys: tuple[str, ...], keys_file: str, *, source: str | None = None) -> frozenset[str]:
    """The configured API keys: `http_api_keys` and the lines of `http_api_keys_file` (blank lines
    and `#` comments skipped). An unreadable file, or a key shorter than 16 characters, is a
    ConfigError naming the setting."""
    from node.errors import ConfigError

    found = [(key.strip(), "http_api_keys") for key in keys if key.strip()]
    if keys_file:
        try:
            lines = Path(keys_file).expanduser().read_text().splitlines()
        except OSError as exc:
            raise ConfigError("http_api_keys_file", keys_file, f"cannot read it: {exc.strerror or exc}",
                              source=source) from None
        found += [(line.strip(), "http_api_keys_file") for line in lines
                  if line.strip() and not line.lstrip().startswith("#")]
    for key, setting in found:
        if len(key) < MIN_KEY_CHARS or any(c.isspace() for c in key):
            raise ConfigError(setting, "<secret>", f"an API key must be at least {MIN_KEY_CHARS} characters "
                              "without spaces", source=source if setting == "http_api_keys_file" else None)
    return frozenset(key for key, _ in found)
