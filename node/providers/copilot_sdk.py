"""The `copilot_sdk` provider: GitHub Copilot through the `github-copilot-sdk` package and the `copilot` CLI.

How it runs. The SDK (asyncio) starts the Copilot CLI as a child process
(``copilot --headless --no-auto-update --log-level error --stdio``) and speaks JSON-RPC to it
over stdio, or connects to an already running CLI server at `cli_url` (``host:port``, TCP).
Each generation runs in its own worker thread with its own asyncio loop:

    start the client -> auth.getStatus -> create a session (model, streaming, no tools)
    -> session.send(prompt) -> assistant.message_delta events ... -> session.idle
    -> delete the session -> stop the client (the CLI child exits)

One loop, one client and one CLI process per generation, not a long-lived client per provider:
the provider has no close hook and the router builds a fresh instance per request when
provider caching is off, so a long-lived CLI child would leak; a hung or crashed CLI only ever
affects one request; and cancelling a request is simply "kill that child", which provably leaves
no process behind. The price is the CLI's start-up on every request; to avoid it, run one CLI
server yourself and set `cli_url` (then each request costs a TCP connect and a handshake).

Safety. Sessions are created with no tools (``available_tools=[]``), every permission request
is rejected and repository custom instructions are skipped: a routed prompt (possibly from a
mesh peer) must never run commands or edit files on this machine, and the answer must not
depend on the node's working directory. Each session is deleted after its answer, so routed
prompts do not pile up under ``~/.copilot``. The SDK never downloads a runtime here: the
executable is always passed explicitly and ``COPILOT_SKIP_CLI_DOWNLOAD=1`` is set.

Prompts: chat messages are joined as ``role: content`` lines (`messages_to_text`); request
params such as temperature have no Copilot equivalent and are ignored.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import logging
import math
import os
import re
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from node.errors import (
    ProviderAuthError,
    ProviderError,
    ProviderFailed,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from node.providers.base import BaseProvider, Completion, ProviderRequest, Readiness

if TYPE_CHECKING:
    from node.config import Settings

__all__ = ["CopilotSDKProvider", "CopilotSDKStatistics", "SDK_DISTRIBUTION", "SDK_VERSION_TESTED"]

SDK_DISTRIBUTION = "github-copilot-sdk"  # the PyPI name; its import name is `copilot`
SDK_VERSION_TESTED = "1.0.27"  # the version this adapter was written and tested against
READINESS_TTL = 30.0  # seconds a readiness answer is reused: the router asks on every request
ABORT_GRACE = 2.0  # seconds each of session.abort / session.delete may take on the way out
STOP_GRACE = 5.0  # seconds a graceful client stop (runtime.shutdown, stdin EOF) may take before the CLI is killed
JOIN_GRACE = 20.0  # seconds a caller waits for the SDK thread to clean up after a cancel (2 + 2 + 5 + 5 worst case)

INSTALL_SDK_HINT = f"pip install '{SDK_DISTRIBUTION}=={SDK_VERSION_TESTED}'"
INSTALL_CLI_HINT = (
    "install the Copilot CLI: `npm install -g @github/copilot`, or set "
    "[providers.copilot_sdk] cli_path (ACCELMESH_PROVIDERS_COPILOT_SDK_CLI_PATH) to the `copilot` "
    "executable, or cli_url to a running CLI server"
)
LOGIN_HINT = (
    "log in once by running `copilot` and typing /login, or set COPILOT_GITHUB_TOKEN "
    "(or GH_TOKEN / GITHUB_TOKEN) to a token with Copilot access"
)

# How the CLI words a missing or refused login when it gives no status code; the real CLI 1.0.102
# without credentials says "Execution failed: InvalidArg, No GitHub OAuth token or Copilot HMAC key provided".
_AUTH_WORDS = re.compile(
    r"not authenticated|unauthori[sz]ed|not logged in|log ?in required|sign ?in|oauth token|hmac key|bad credentials",
    re.I,
)

# The forms the SDK's `_parse_cli_url` accepts: "port", "host:port", "[ipv6]:port", optional http(s)://.
_CLI_URL = re.compile(r"(https?://)?(\d{1,5}|(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]*):\d{1,5})")

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CopilotSDKStatistics:
    """A snapshot of one Copilot SDK provider (`CopilotSDKProvider.statistics()`)."""

    started: int  # generations started (each one runs its own CLI, or connects to `cli_url`)
    in_flight: int  # generations running now
    cli_url: str | None  # the CLI server connected to; None when each generation starts its own CLI


class CopilotSDKProvider(BaseProvider):
    """GitHub Copilot via `github-copilot-sdk`; see the module docstring for the design."""

    name = "copilot_sdk"

    def __init__(
        self,
        *,
        cli_path: str = "copilot",
        cli_url: str = "",
        model: str = "",
        timeout: float = 300.0,
    ) -> None:
        self.cli_path = cli_path
        self.cli_url = cli_url
        self.model = model
        self.timeout = timeout
        self._readiness: tuple[float, Readiness] | None = None
        self._readiness_lock = threading.Lock()
        self._lock = threading.Lock()
        self._started = 0
        self._in_flight = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> CopilotSDKProvider:
        s = settings.providers.copilot_sdk
        return cls(cli_path=s.cli_path, cli_url=s.cli_url, model=s.model, timeout=s.timeout)

    # -- readiness and identity ---------------------------------------------------------

    def available(self) -> Readiness:
        """Cheap and cached: the router calls this from its event loop on every request.

        The SDK is found through its distribution metadata and import spec rather than imported
        (the import takes ~2 s); login is only known once the CLI runs, so it is checked at the
        first request and reported as `ProviderAuthError`.
        """
        now = time.monotonic()
        with self._readiness_lock:
            if self._readiness is not None and now - self._readiness[0] < READINESS_TTL:
                return self._readiness[1]
        readiness = self._check_readiness()
        with self._readiness_lock:
            self._readiness = (now, readiness)
        return readiness

    def _check_readiness(self) -> Readiness:
        try:
            version = importlib.metadata.version(SDK_DISTRIBUTION)
        except importlib.metadata.PackageNotFoundError:
            return Readiness(False, f"the Python package {SDK_DISTRIBUTION} is not installed: {INSTALL_SDK_HINT}")
        if importlib.util.find_spec("copilot") is None:
            return Readiness(False, f"{SDK_DISTRIBUTION} {version} is installed but `import copilot` finds nothing")
        if self.cli_url:
            if not _CLI_URL.fullmatch(self.cli_url):
                return Readiness(False, f"cli_url {self.cli_url!r} is not host:port (e.g. localhost:3000)")
            return Readiness(True, f"Copilot CLI server at {self.cli_url} via {SDK_DISTRIBUTION} {version}")
        path = self._resolved_cli()
        if path is None:
            return Readiness(False, f"Copilot CLI {self.cli_path!r} not found on PATH or not executable: {INSTALL_CLI_HINT}")
        return Readiness(True, f"Copilot CLI {path} via {SDK_DISTRIBUTION} {version} (login checked at first use)")

    def _resolved_cli(self) -> str | None:
        return shutil.which(self.cli_path) if self.cli_path else None

    def models(self) -> tuple[str, ...]:
        return (self.model,) if self.model else ()

    def model_identity(self, model: str | None) -> str:
        model = model or self.model
        return f"{self.name}/{model}" if model else self.name

    def statistics(self) -> CopilotSDKStatistics:
        with self._lock:
            return CopilotSDKStatistics(started=self._started, in_flight=self._in_flight,
                                        cli_url=self.cli_url or None)

    def __repr__(self) -> str:
        s = self.statistics()
        target = f"cli_url={s.cli_url!r}" if s.cli_url else f"cli_path={self.cli_path!r}"
        return (f"<{type(self).__name__} {target} model={self.model or 'default'!r} "
                f"started={s.started} in_flight={s.in_flight}>")

    # -- generation ---------------------------------------------------------------------

    async def astream(self, request: ProviderRequest) -> AsyncIterator[str | Completion]:
        import trio

        send, recv = trio.open_memory_channel[tuple[str, Any]](math.inf)
        # Unbounded on purpose: SDK events arrive in callbacks that cannot wait; the answer's
        # own length bounds what is buffered, and the consumer normally drains as it arrives.
        token = trio.lowlevel.current_trio_token()

        def emit(kind: str, item: Any) -> None:
            try:
                token.run_sync_soon(_deliver, send, kind, item)
            except trio.RunFinishedError:
                pass  # the trio run is gone; nobody is listening any more

        job = _Job(self, request, emit)
        deadline = trio.current_time() + self._budget(request) + JOIN_GRACE
        finished = False
        job.start()
        try:
            while True:
                with trio.move_on_at(deadline) as scope:
                    kind, item = await recv.receive()
                if scope.cancelled_caught:
                    raise ProviderTimeout(self.name, "the Copilot SDK thread did not finish in time")
                if kind == "end":
                    finished = True
                    if isinstance(item, BaseException):
                        raise item
                    yield item
                    return
                yield item
        finally:
            if not finished:
                job.cancel()
                with trio.CancelScope(shield=True, deadline=trio.current_time() + JOIN_GRACE):
                    async for kind, _ in recv:  # "end" comes once the CLI has been stopped
                        if kind == "end":
                            break
            recv.close()

    def complete_sync(self, request: ProviderRequest) -> Completion:
        job = _Job(self, request, None)
        job.start()
        try:
            if not job.done.wait(self._budget(request) + JOIN_GRACE):
                raise ProviderTimeout(self.name, "the Copilot SDK thread did not finish in time")
        finally:
            if not job.done.is_set():
                job.cancel()
                job.done.wait(JOIN_GRACE)
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def _budget(self, request: ProviderRequest) -> float:
        return max(0.0, min(request.timeout, self.timeout))

    def _count(self, delta: int) -> None:
        with self._lock:
            self._in_flight += delta
            if delta > 0:
                self._started += 1

    # Runs on the job's asyncio loop.
    async def _generate(self, request: ProviderRequest, emit: Callable[[str, Any], None] | None) -> Completion:
        if os.environ.get("COPILOT_SKIP_CLI_DOWNLOAD") != "1":
            os.environ["COPILOT_SKIP_CLI_DOWNLOAD"] = "1"  # never let the SDK fetch a runtime
        try:
            from copilot import CopilotClient, RuntimeConnection
        except ImportError as exc:
            raise ProviderUnavailable(self.name, f"cannot import the Copilot SDK ({exc}): {INSTALL_SDK_HINT}") from exc

        if self.cli_url:
            connection = RuntimeConnection.for_uri(self.cli_url)
        else:
            path = self._resolved_cli()
            if path is None:
                raise ProviderUnavailable(self.name, f"Copilot CLI {self.cli_path!r} not found: {INSTALL_CLI_HINT}")
            connection = RuntimeConnection.for_stdio(path=path)
        try:
            client = CopilotClient(connection=connection, log_level="error")
        except ValueError as exc:  # e.g. a malformed cli_url
            raise ProviderFailed(self.name, f"bad Copilot SDK configuration: {exc}") from exc

        budget = self._budget(request)
        turn = _Turn(emit)
        session: Any = None
        answered = False
        try:
            async with asyncio.timeout(budget) as scope:
                await client.start()
                await self._check_login(client)
                session = await client.create_session(on_event=turn.on_event, **self._session_options(request))
                await session.send(request.text)
                await turn.done.wait()
            answered = turn.error is None
        except TimeoutError as exc:
            if scope.expired():
                raise ProviderTimeout(self.name, f"no answer from Copilot within {budget:g} s") from None
            raise self._translate(exc) from exc
        except ProviderError:
            raise
        except Exception as exc:
            raise self._translate(exc) from exc
        finally:
            await _close(client, session, answered=answered)
        if turn.error is not None:
            raise self._session_error(turn.error)
        return turn.completion(request.model or self.model or None)

    def _session_options(self, request: ProviderRequest) -> dict[str, Any]:
        from copilot.rpc import PermissionDecisionReject

        def reject(_request: Any, _invocation: Any) -> Any:
            return PermissionDecisionReject(feedback="tools are disabled for accelmesh requests")

        options: dict[str, Any] = {
            "streaming": True,
            "include_sub_agent_streaming_events": False,
            "available_tools": [],
            "on_permission_request": reject,
            "skip_custom_instructions": True,
        }
        model = request.model or self.model
        if model:
            options["model"] = model
        return options

    async def _check_login(self, client: Any) -> None:
        try:
            status = await client.get_auth_status()
        except Exception as exc:
            if getattr(exc, "code", None) == -32601:  # a runtime without auth.getStatus: the turn will tell
                return
            raise
        if not status.isAuthenticated:
            detail = f" ({status.statusMessage})" if status.statusMessage else ""
            raise ProviderAuthError(self.name, f"the Copilot CLI is not logged in{detail}; {LOGIN_HINT}")

    def _translate(self, exc: BaseException) -> ProviderError:
        """An SDK or transport exception as this provider's error.

        Duck-typed: the SDK's JsonRpcError (``code``, ``message``) and ProcessExitedError live in
        its private ``copilot._jsonrpc`` module.
        """
        message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        if _AUTH_WORDS.search(message):
            return ProviderAuthError(self.name, f"{message}; {LOGIN_HINT}")
        if type(exc).__name__ == "ProcessExitedError":
            return ProviderFailed(self.name, f"the Copilot CLI exited: {message}")
        code = getattr(exc, "code", None)
        if isinstance(code, int):
            return ProviderFailed(self.name, f"Copilot CLI error {code}: {message}")
        return ProviderFailed(self.name, f"{type(exc).__name__}: {message}")

    def _session_error(self, data: Any) -> ProviderError:
        """A `session.error` event's data (SessionErrorData) as this provider's error."""
        remediation = getattr(getattr(data, "remediation", None), "value", None)
        status = getattr(data, "status_code", None)
        message = f"{data.error_type}: {data.message}" if data.error_type else data.message
        if remediation in ("sign_in", "switch_account") or status in (401, 403) or _AUTH_WORDS.search(data.message):
            return ProviderAuthError(self.name, f"{message}; {LOGIN_HINT}")
        if status == 429:
            return RateLimited(self.name, message)
        return ProviderFailed(self.name, message, retryable=status is not None and status >= 500)


class _Turn:
    """Collects one turn's events (on the job's loop) and forwards text deltas."""

    def __init__(self, emit: Callable[[str, Any], None] | None) -> None:
        self.emit = emit
        self.done = asyncio.Event()
        self.parts: list[str] = []
        self.error: Any = None
        self.model: str | None = None
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None
        self._streamed: set[str] = set()

    def on_event(self, event: Any) -> None:
        from copilot.session_events import (
            AssistantMessageData,
            AssistantMessageDeltaData,
            AssistantUsageData,
            SessionErrorData,
            SessionIdleData,
        )

        if event.agent_id or self.done.is_set():
            return  # sub-agent traffic, or late events after the turn ended
        data = event.data
        if isinstance(data, AssistantMessageDeltaData):
            if data.delta_content and data.parent_tool_call_id is None:
                self._streamed.add(data.message_id)
                self._text(data.delta_content)
        elif isinstance(data, AssistantMessageData):
            self.model = data.model or self.model
            if data.message_id not in self._streamed and data.content and data.parent_tool_call_id is None:
                self._text(data.content)  # no deltas came for this message: send it whole
        elif isinstance(data, AssistantUsageData):
            self.model = data.model or self.model
            if data.input_tokens is not None:
                self.input_tokens = (self.input_tokens or 0) + data.input_tokens
            if data.output_tokens is not None:
                self.output_tokens = (self.output_tokens or 0) + data.output_tokens
        elif isinstance(data, SessionErrorData):
            self.error = data
            self.done.set()
        elif isinstance(data, SessionIdleData):
            self.done.set()

    def _text(self, text: str) -> None:
        self.parts.append(text)
        if self.emit is not None:
            self.emit("text", text)

    def completion(self, requested_model: str | None) -> Completion:
        return Completion(
            text="".join(self.parts),
            model=requested_model or self.model,
            prompt_tokens=self.input_tokens,
            completion_tokens=self.output_tokens,
        )


async def _bounded(awaitable: Any, seconds: float) -> bool:
    """Await with a time limit; any failure (including a pending cancel) just returns False."""
    try:
        await asyncio.wait_for(awaitable, seconds)
    except (Exception, asyncio.CancelledError):
        return False
    return True


async def _close(client: Any, session: Any, *, answered: bool) -> None:
    """Stop SDK-side work: abort an unfinished turn, delete the session, stop the CLI.

    A graceful stop (runtime.shutdown, close stdin) is tried first even after a failure: the npm
    `copilot` is a Node loader that runs the native CLI as its own child, so killing the loader
    (all `force_stop` does) would orphan the native process. Only if that fails is the child
    killed, and its stdin closed so an orphaned grandchild still sees end-of-input and exits.
    """
    process = getattr(client, "_cli_process", None)  # private, read only to close stdin below
    if session is not None:
        if not answered:
            await _bounded(session.abort(), ABORT_GRACE)  # matters for a shared server (cli_url)
        await _bounded(client.delete_session(session.session_id), ABORT_GRACE)
    if await _bounded(client.stop(), STOP_GRACE):
        return
    try:
        await client.force_stop()  # kills and reaps an owned CLI child; closes a cli_url socket
    except (Exception, asyncio.CancelledError) as exc:
        _log.warning("copilot_sdk: could not stop the Copilot CLI: %s", exc)
    stdin = getattr(process, "stdin", None)
    if stdin is not None:
        try:
            stdin.close()
        except OSError:
            pass


def _deliver(send: Any, kind: str, item: Any) -> None:
    """Runs on the trio loop (run_sync_soon): must never raise."""
    import trio

    try:
        send.send_nowait((kind, item))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return
    if kind == "end":
        send.close()


class _Job:
    """One generation: a thread running its own asyncio loop that drives the SDK.

    `emit(kind, item)` receives ``("text", str)`` for each delta and finally ``("end",
    Completion | exception)``, sent only after the loop, and with it the CLI, has been shut down.
    """

    def __init__(
        self,
        provider: CopilotSDKProvider,
        request: ProviderRequest,
        emit: Callable[[str, Any], None] | None,
    ) -> None:
        self.provider, self.request, self.emit = provider, request, emit
        self.done = threading.Event()
        self.result: Completion | None = None
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[Completion] | None = None
        self._cancelled = False

    def start(self) -> None:
        threading.Thread(target=self._main, name="copilot-sdk-job", daemon=True).start()

    def cancel(self) -> None:
        """Thread-safe: cancel the SDK-side work (the job still cleans up and then ends)."""
        with self._lock:
            self._cancelled = True
            loop, task = self._loop, self._task
        if loop is not None and task is not None:
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:
                pass  # the loop already closed: the job is over

    def _main(self) -> None:
        provider = self.provider
        provider._count(+1)
        loop = asyncio.new_event_loop()
        try:
            with self._lock:
                self._loop = loop
                self._task = loop.create_task(provider._generate(self.request, self.emit))
                if self._cancelled:
                    self._task.cancel()
            try:
                self.result = loop.run_until_complete(self._task)
            except asyncio.CancelledError:
                self.error = ProviderFailed(provider.name, "cancelled")
            except ProviderError as exc:
                self.error = exc
            except BaseException as exc:  # a bug in this adapter or the SDK: report, never hang
                self.error = ProviderFailed(provider.name, f"{type(exc).__name__}: {exc}")
            finally:
                try:
                    loop.run_until_complete(loop.shutdown_asyncgens())
                    loop.run_until_complete(loop.shutdown_default_executor())
                finally:
                    with self._lock:
                        self._loop = None
                    loop.close()
        finally:
            provider._count(-1)
            self.done.set()
            if self.emit is not None:
                self.emit("end", self.error if self.error is not None else self.result)
