"""The data directory: identities, the daemon lock, and daemon.json (INTERFACES.md "Files in the data dir")."""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node.errors import DaemonError

if TYPE_CHECKING:  # pragma: no cover
    from protocols.records import Identity

__all__ = ["DataDir", "DaemonInfo", "pid_alive"]

KEY_MODE = 0o600


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


@dataclass(frozen=True)
class DaemonInfo:
    """What daemon.json says about a running daemon."""

    peer_id: str
    multiaddrs: tuple[str, ...]
    pid: int
    version: str
    http_url: str | None = None
    cluster_key_file: str | None = None

    @property
    def alive(self) -> bool:
        return pid_alive(self.pid)

    @property
    def loopback_addr(self) -> str:
        return self.multiaddrs[0]


class DataDir:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()
        self._lock_fd: int | None = None

    identity_file = property(lambda self: self.path / "identity.key")
    client_key_file = property(lambda self: self.path / "client.key")
    daemon_json = property(lambda self: self.path / "daemon.json")
    lock_file = property(lambda self: self.path / "daemon.lock")
    store_file = property(lambda self: self.path / "cache.sqlite")

    def ensure(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)

    # -- keys ----------------------------------------------------------------------------

    def _key(self, path: Path, create: bool) -> Identity:
        from protocols.errors import MalformedMessage  # (imported here: reading daemon.json needs no crypto,
        from protocols.records import Identity  # and the CLI's `generate` through HTTP starts faster)

        if path.exists():
            mode = path.stat().st_mode & 0o777
            if mode & 0o077:
                raise DaemonError(f"{path} is readable by others (mode {mode:o}); run `chmod 600 {path}`")
            try:
                return Identity.from_protobuf(path.read_bytes())
            except MalformedMessage as exc:
                raise DaemonError(f"{path} is not a libp2p Ed25519 private key: {exc}") from None
        if not create:
            raise DaemonError(f"{path} does not exist; run `accelmesh init --data-dir {self.path}`")
        self.ensure()
        identity = Identity.generate()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_MODE)
        with os.fdopen(fd, "wb") as fh:
            fh.write(identity.to_protobuf())
        return identity

    def identity(self, create: bool = True) -> Identity:
        """The daemon's persistent identity (created with mode 0600 on first use)."""
        return self._key(self.identity_file, create)

    def client_identity(self, create: bool = True) -> Identity:
        """The local client's identity: always allowed to use the control protocol."""
        return self._key(self.client_key_file, create)

    # -- the one-daemon-per-directory lock ------------------------------------------------

    def lock(self) -> None:
        """Take the data dir for this process; DaemonError if another daemon holds it."""
        self.ensure()
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DaemonError(f"another daemon (pid {holder}) is running on {self.path}") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- daemon.json -----------------------------------------------------------------------

    def write_daemon_json(self, info: dict[str, Any]) -> None:
        """Atomically: a temp file in the same directory, then rename."""
        self.ensure()
        fd, tmp = tempfile.mkstemp(prefix=".daemon.json.", dir=self.path)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(info, fh, indent=2)
                fh.write("\n")
            os.replace(tmp, self.daemon_json)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def remove_daemon_json(self) -> None:
        self.daemon_json.unlink(missing_ok=True)

    def daemon(self) -> DaemonInfo | None:
        """The running daemon, or None when there is no daemon.json or its pid is dead."""
        try:
            data = json.loads(self.daemon_json.read_text())
            info = DaemonInfo(
                peer_id=data["peer_id"], multiaddrs=tuple(data["multiaddrs"]), pid=int(data["pid"]),
                version=data.get("version", "?"), http_url=data.get("http_url"),
                cluster_key_file=data.get("cluster_key_file"),
            )
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            raise DaemonError(f"{self.daemon_json} is unreadable: {exc}") from None
        return info if info.alive else None

    def require_daemon(self) -> DaemonInfo:
        info = self.daemon()
        if info is None:
            raise DaemonError(f"no daemon is running on {self.path} (start one with "
                              f"`accelmesh daemon --data-dir {self.path}`)")
        return info

    def __repr__(self) -> str:
        return f"<DataDir {self.path}>"
