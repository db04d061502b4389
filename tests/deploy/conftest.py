"""deploy/ tests reuse the system tests' daemon subprocess fixtures."""

from tests.system.conftest import accelmesh_cmd, start_daemon

__all__ = ["accelmesh_cmd", "start_daemon"]
