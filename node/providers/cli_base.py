"""The shared machinery of providers that answer by running a command-line LLM tool non-interactively.

A `CLIProvider` subclass says which command to run (`argv`, `stdin_text`) and how to read the
tool's output (an `OutputParser`); this module does the rest, the same way on both paths:

- each run gets a private scratch directory: an empty working directory for the tool (so it
  sees no project files and loads no project instructions), the prompt file its stdin reads
  (or /dev/null) and the file its stderr goes to. Neither stdin nor stderr is a pipe, so the
  async path reads one stream only and never needs a task that outlives a ``yield``;
- the tool runs in a new session (``start_new_session=True``), so it and everything it
  starts form one process group, which is what gets signalled: on cancellation, on timeout
  and after a normal exit (stragglers), SIGTERM first, SIGKILL after `KILL_GRACE` seconds;
- stdout is fed, as it arrives, to a `CLIRun` (sans-I/O: split into bounded lines, parsed,
  answer text collected); its outcome (answer or classified error) is decided by one function
  for both paths: `CLIProvider.outcome`.

Errors: the tool's executable cannot be started -> `ProviderUnavailable` (with an install hint);
the tool says credentials are missing -> `ProviderAuthError` (with the login command); no
answer within min(request timeout, provider timeout) -> `ProviderTimeout`; any other failure
(non-zero exit, an error reported in the output, no answer text, output over its limits) ->
`ProviderFailed`, whose message quotes the tail of stderr.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from node.errors import (
    ProviderAuthError,
    ProviderError,
    ProviderFailed,
    ProviderTimeout,
    ProviderUnavailable,
)
from node.providers.base import BaseProvider, Completion, ProviderRequest, Readiness

if TYPE_CHECKING:
    from node.config import Settings

__all__ = [
    "CLIProvider",
    "CLIRun",
    "CLIStatistics",
    "Invocation",
    "JSONLParser",
    "OutputParser",
    "prompt_argument",
    "MAX_ARG_BYTES",
    "MAX_LINE_BYTES",
    "MAX_OUTPUT_BYTES",
    "STDERR_TAIL_CHARS",
    "VERSION_TIMEOUT",
    "READINESS_TTL",
    "KILL_GRACE",
]

MAX_LINE_BYTES = 8 * 1024 * 1024  # one line of output (one JSONL event): a long answer, JSON-escaped, fits
MAX_OUTPUT_BYTES = 64 * 1024 * 1024  # all of one run's stdout; a tool printing more is stopped, not buffered
MAX_ARG_BYTES = 128 * 1024 - 1  # Linux MAX_ARG_STRLEN: one argv string is at most 32 pages, counting its NUL
STDERR_TAIL_CHARS = 2000  # how much of the end of stderr an error message quotes
VERSION_TIMEOUT = 10.0  # seconds `<binary> --version` may take in a readiness check
READINESS_TTL = 30.0  # seconds a readiness answer is reused: the router asks before every call
KILL_GRACE = 0.5  # seconds between SIGTERM and SIGKILL of a run's process group
READ_SIZE = 64 * 1024  # bytes asked of the stdout pipe per read

MESSAGE_SEPARATOR = "\n\n"  # put between two assistant messages of one run (tools with several turns)


# ---------------------------------------------------------------------------------------
# Output parsing (pure): one parser per run, fed stdout line by line.


class OutputParser:
    """Reads one tool's stdout line by line: answer text out, plus what the tool said about the run.

    `feed_line` returns the text chunks a line adds to the answer (possibly none); `finish`
    returns the chunks to add at end of output (e.g. the final text, when nothing streamed).
    The chunks of a run concatenate to its answer. The attributes describe the run:

    - `error`: a failure the tool reported in its output; the run fails even if it exits 0;
    - `warning`: the last non-fatal error it reported, quoted if the run fails for another reason;
    - `auth_failed`: the output itself says credentials are missing or were refused;
    - `model`, `prompt_tokens`, `completion_tokens`: as reported by the tool, else None.
    """

    def __init__(self) -> None:
        self.error: str | None = None
        self.warning: str | None = None
        self.auth_failed = False
        self.model: str | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self._last_message: object = None
        self._emitted = False

    def feed_line(self, line: str) -> list[str]:
        raise NotImplementedError

    def finish(self) -> list[str]:
        return []

    @property
    def emitted(self) -> bool:
        """Whether any answer text has been returned yet."""
        return self._emitted

    def message_text(self, message_id: object, text: str) -> list[str]:
        """`text` as chunks of assistant message `message_id`, separated from an earlier message."""
        if not text:
            return []
        if self._emitted and message_id != self._last_message:
            text = MESSAGE_SEPARATOR + text
        self._last_message = message_id
        self._emitted = True
        return [text]


class JSONLParser(OutputParser):
    """A parser for tools printing one JSON object per line; lines that are not JSON objects are skipped."""

    def feed_line(self, line: str) -> list[str]:
        line = line.strip()
        if not line:
            return []
        try:
            event = json.loads(line)
        except ValueError:
            return []
        return self.feed_event(event) if isinstance(event, dict) else []

    def feed_event(self, event: Mapping[str, Any]) -> list[str]:
        raise NotImplementedError


def as_int(value: Any) -> int | None:
    """A token count from a tool's JSON, or None when it is not an integer."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def as_text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


class CLIRun:
    """One run's stdout as it arrives: split into lines (each at most `max_line_bytes`), parsed.

    Sans-I/O: `feed(bytes)` returns the answer chunks completed by those bytes, `close()` the
    rest at end of output. Raises `ProviderFailed` when a line or the whole output is over its limit.
    """

    def __init__(
        self,
        provider: str,
        parser: OutputParser,
        *,
        max_line_bytes: int = MAX_LINE_BYTES,
        max_output_bytes: int = MAX_OUTPUT_BYTES,
    ) -> None:
        self.provider = provider
        self.parser = parser
        self.max_line_bytes = max_line_bytes
        self.max_output_bytes = max_output_bytes
        self.received = 0
        self.chunks: list[str] = []
        self._buffer = bytearray()

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    def feed(self, data: bytes) -> list[str]:
        self.received += len(data)
        if self.received > self.max_output_bytes:
            raise ProviderFailed(self.provider, f"printed more than {self.max_output_bytes} bytes on stdout")
        self._buffer += data
        out: list[str] = []
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            out += self._line(line)
        if len(self._buffer) > self.max_line_bytes:
            raise self._line_too_long()
        return out

    def close(self) -> list[str]:
        rest = bytes(self._buffer)
        self._buffer.clear()
        out = self._line(rest) if rest else []
        extra = [chunk for chunk in self.parser.finish() if chunk]
        self.chunks += extra
        return out + extra

    def _line(self, raw: bytes) -> list[str]:
        if len(raw) > self.max_line_bytes:
            raise self._line_too_long()
        chunks = [chunk for chunk in self.parser.feed_line(raw.decode("utf-8", "replace")) if chunk]
        self.chunks += chunks
        return chunks

    def _line_too_long(self) -> ProviderFailed:
        return ProviderFailed(self.provider, f"printed a line longer than {self.max_line_bytes} bytes")


def prompt_argument(provider: str, flag: str, prompt: str) -> str:
    """``--flag=PROMPT`` as one argv string (``=`` keeps a prompt starting with ``-`` a value).

    Raises `ProviderFailed` when the prompt cannot travel as an argument: longer than
    `MAX_ARG_BYTES` with the flag, or holding a NUL byte.
    """
    argument = f"{flag}={prompt}"
    size = len(argument.encode("utf-8", "surrogatepass"))
    if size > MAX_ARG_BYTES:
        raise ProviderFailed(
            provider,
            f"the prompt is too long to pass as `{flag}`: {size} bytes with the flag, at most {MAX_ARG_BYTES} "
            "(Linux caps one command-line argument at 128 KiB)",
        )
    if "\x00" in prompt:
        raise ProviderFailed(provider, f"the prompt holds a NUL character, which `{flag}` cannot carry")
    return argument


# ---------------------------------------------------------------------------------------
# Process plumbing shared by both paths.


@dataclass(frozen=True)
class Invocation:
    """What one run executes: the command line, and the text fed on stdin (None: stdin is /dev/null)."""

    argv: tuple[str, ...]
    stdin: str | None = None


@dataclass(frozen=True)
class CLIStatistics:
    """Counters of one CLI provider instance."""

    started: int
    in_flight: int
    succeeded: int
    failed: int
    timed_out: int
    cancelled: int


class _Scratch:
    """A run's private directory: the tool's empty working directory, its stdin and stderr files."""

    def __init__(self, stdin_text: str | None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="accelmesh-cli-"))
        self.cwd = self.root / "work"
        self.cwd.mkdir()
        if stdin_text is None:
            self.stdin = open(os.devnull, "rb")  # noqa: SIM115 - closed in close()
        else:
            prompt = self.root / "stdin"
            prompt.write_text(stdin_text, encoding="utf-8", errors="surrogatepass")
            self.stdin = open(prompt, "rb")  # noqa: SIM115
        self.stderr_path = self.root / "stderr"
        self.stderr = open(self.stderr_path, "wb")  # noqa: SIM115

    def stderr_tail(self) -> str:
        """The end of what the tool printed on stderr (at most `STDERR_TAIL_CHARS` characters)."""
        self.stderr.flush()
        with open(self.stderr_path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - 4 * STDERR_TAIL_CHARS))
            text = fh.read().decode("utf-8", "replace")
        return text[-STDERR_TAIL_CHARS:].strip()

    def close(self) -> None:
        self.stdin.close()
        self.stderr.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> _Scratch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _signal_group(pgid: int, signum: int) -> None:
    """Signal every process of group `pgid`; a group already gone is fine.

    After a normal exit the leader has been reaped before its stragglers are killed; the
    group id cannot be reused while a straggler holds it, and an empty group answers ESRCH.
    """
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _stop_group_sync(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the run's process group, SIGKILL it after `grace` seconds, reap the leader."""
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


async def _stop_group(proc: Any, grace: float) -> None:
    """The same as `_stop_group_sync` for a trio process; call it shielded from cancellation."""
    import trio

    if proc.returncode is None:
        _signal_group(proc.pid, signal.SIGTERM)
        with trio.move_on_after(grace):
            await proc.wait()
    _signal_group(proc.pid, signal.SIGKILL)
    await proc.wait()
    if proc.stdout is not None:
        await proc.stdout.aclose()


def _exit_description(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with status {returncode}"


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------
# The provider.


class CLIProvider(BaseProvider):
    """Base of the providers that run a CLI tool; subclasses set the class attributes and `argv`.

    Chat requests are sent as `request.text` (``role: content`` lines) unless a subclass knows
    better. Request params (``max_tokens``, ``temperature``...) are ignored unless a subclass
    maps them: none of the four supported tools has flags for them.
    """

    name: ClassVar[str] = "cli"
    default_binary: ClassVar[str] = ""  # the executable's usual name, e.g. "codex"
    package: ClassVar[str] = ""  # the npm package that installs it, for the install hint
    login_hint: ClassVar[str] = ""  # says the tool is not logged in and how to log in
    login_pattern: ClassVar[re.Pattern[str]] = re.compile(r"(?!)")  # output saying credentials are missing
    auth_exit_codes: ClassVar[frozenset[int]] = frozenset()  # exit statuses meaning "not logged in"

    kill_grace: float = KILL_GRACE
    max_line_bytes: int = MAX_LINE_BYTES
    max_output_bytes: int = MAX_OUTPUT_BYTES

    def __init__(self, *, binary: str = "", model: str = "", timeout: float = 300.0) -> None:
        self.binary = binary or self.default_binary
        self.model = model
        self.timeout = timeout
        self._lock = threading.Lock()
        self._readiness: tuple[float, Readiness] | None = None
        self._counts = {"started": 0, "in_flight": 0, "succeeded": 0, "failed": 0, "timed_out": 0, "cancelled": 0}

    @classmethod
    def from_settings(cls, settings: Settings) -> CLIProvider:
        section = getattr(settings.providers, cls.name)
        return cls(binary=section.binary, model=section.model, timeout=section.timeout)

    # -- what subclasses provide -------------------------------------------------------

    def argv(self, request: ProviderRequest) -> list[str]:
        """The command line for `request`, starting with `self.binary`."""
        raise NotImplementedError

    def stdin_text(self, request: ProviderRequest) -> str | None:
        """Text fed on the tool's stdin, or None for /dev/null (the default)."""
        return None

    def new_parser(self) -> OutputParser:
        raise NotImplementedError

    # -- model -------------------------------------------------------------------------

    def models(self) -> tuple[str, ...]:
        return (self.model,) if self.model else ()

    def request_model(self, request: ProviderRequest) -> str:
        """The model to ask the tool for: the request's, else the configured one, else "" (tool default)."""
        return request.model or self.model

    # -- readiness ---------------------------------------------------------------------

    def available(self) -> Readiness:
        """Ready when the binary is found and ``--version`` exits 0 within `VERSION_TIMEOUT` s.

        The answer is reused for `READINESS_TTL` seconds.
        """
        with self._lock:
            cached = self._readiness
        if cached is not None and time.monotonic() - cached[0] < READINESS_TTL:
            return cached[1]
        readiness = self._check_readiness()
        with self._lock:
            self._readiness = (time.monotonic(), readiness)
        return readiness

    def missing_reason(self) -> str:
        where = (
            f"`{self.binary}` does not exist or is not executable"
            if os.sep in self.binary
            else f"`{self.binary}` not found on PATH"
        )
        return f"{where}; install with `npm install -g {self.package}`, or set [providers.{self.name}] binary"

    def _check_readiness(self) -> Readiness:
        path = shutil.which(self.binary)
        if path is None:
            return Readiness(False, self.missing_reason())
        try:
            proc = subprocess.Popen(
                [path, "--version"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            return Readiness(False, f"`{path} --version` could not start: {exc}; {self.missing_reason()}")
        try:
            out, err = proc.communicate(timeout=VERSION_TIMEOUT)
        except subprocess.TimeoutExpired:
            _stop_group_sync(proc, self.kill_grace)
            return Readiness(False, f"`{path} --version` did not answer within {VERSION_TIMEOUT:g} s")
        if proc.returncode != 0:
            detail = _one_line(err.decode("utf-8", "replace") or out.decode("utf-8", "replace")) or "no output"
            return Readiness(False, f"`{path} --version` {_exit_description(proc.returncode)}: {detail}")
        lines = [line.strip() for line in out.decode("utf-8", "replace").splitlines() if line.strip()]
        version = lines[0] if lines else "version unknown"
        return Readiness(True, f"{version} ({path})")

    # -- one run -----------------------------------------------------------------------

    def invocation(self, request: ProviderRequest) -> Invocation:
        return Invocation(tuple(self.argv(request)), self.stdin_text(request))

    def run_timeout(self, request: ProviderRequest) -> float:
        return max(0.0, min(request.timeout, self.timeout))

    def new_run(self) -> CLIRun:
        return CLIRun(
            self.name, self.new_parser(), max_line_bytes=self.max_line_bytes, max_output_bytes=self.max_output_bytes
        )

    def outcome(self, run: CLIRun, returncode: int, stderr: str, request: ProviderRequest) -> Completion:
        """The answer of a finished run, or the error that says why there is none."""
        parser = run.parser
        if returncode == 0 and parser.error is None and run.text:
            return Completion(
                text=run.text,
                model=parser.model or self.request_model(request) or None,
                prompt_tokens=parser.prompt_tokens,
                completion_tokens=parser.completion_tokens,
            )
        reported = parser.error or (parser.warning if returncode != 0 else None)
        evidence = "\n".join(filter(None, (reported, stderr)))
        if parser.auth_failed or returncode in self.auth_exit_codes or self.login_pattern.search(evidence):
            said = _one_line(reported or stderr or _exit_description(returncode))
            raise ProviderAuthError(self.name, f"{self.login_hint} (the tool said: {said})")
        if returncode != 0:
            what = _exit_description(returncode)
        elif parser.error is not None:
            what = "exited with status 0 but reported a failure"
        else:  # most likely its output format changed: better a failure than an empty answer
            what = "exited with status 0 but printed no answer text in the expected format"
        parts = [what]
        if reported:
            parts.append(_one_line(reported, 1000))
        parts.append(f"stderr: {stderr}" if stderr else "stderr: (empty)")
        raise ProviderFailed(self.name, "; ".join(parts))

    def _spawn_error(self, exc: OSError) -> ProviderUnavailable:
        return ProviderUnavailable(self.name, f"{self.missing_reason()} ({exc.strerror or exc})")

    def _timeout_error(self, timeout: float) -> ProviderTimeout:
        return ProviderTimeout(self.name, f"no answer within {timeout:g} s; its process group was killed")

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for key, delta in deltas.items():
                self._counts[key] += delta

    def statistics(self) -> CLIStatistics:
        with self._lock:
            return CLIStatistics(**self._counts)

    # -- the async path ----------------------------------------------------------------

    async def astream(self, request: ProviderRequest) -> AsyncIterator[str | Completion]:
        """Yield the answer's chunks as the tool prints them, then one `Completion`."""
        import trio

        invocation = self.invocation(request)
        timeout = self.run_timeout(request)
        run = self.new_run()
        deadline = trio.current_time() + timeout
        with _Scratch(invocation.stdin) as scratch:
            try:
                proc = await trio.lowlevel.open_process(
                    list(invocation.argv),
                    stdin=scratch.stdin,
                    stdout=subprocess.PIPE,
                    stderr=scratch.stderr,
                    cwd=scratch.cwd,
                    start_new_session=True,
                )
            except OSError as exc:
                raise self._spawn_error(exc) from exc
            self._count(started=1, in_flight=1)
            try:
                while True:
                    data = None
                    with trio.move_on_at(deadline):
                        data = await proc.stdout.receive_some(READ_SIZE)
                    if data is None:
                        raise self._timeout_error(timeout)
                    if not data:
                        break
                    for chunk in run.feed(data):
                        yield chunk
                for chunk in run.close():
                    yield chunk
                with trio.move_on_at(deadline):
                    await proc.wait()
                if proc.returncode is None:
                    raise self._timeout_error(timeout)
            except ProviderTimeout:
                self._count(timed_out=1)
                raise
            except (trio.Cancelled, GeneratorExit):  # cancelled, or the consumer stopped iterating
                self._count(cancelled=1)
                raise
            except BaseException:
                self._count(failed=1)
                raise
            finally:
                with trio.CancelScope(shield=True):
                    await _stop_group(proc, self.kill_grace)
                self._count(in_flight=-1)
            try:
                completion = self.outcome(run, proc.returncode, scratch.stderr_tail(), request)
            except ProviderError:
                self._count(failed=1)
                raise
        self._count(succeeded=1)
        yield completion

    # -- the sync path -----------------------------------------------------------------

    def complete_sync(self, request: ProviderRequest) -> Completion:
        """The same run without an event loop: `communicate` with the timeout, then the group is stopped."""
        invocation = self.invocation(request)
        timeout = self.run_timeout(request)
        run = self.new_run()
        with _Scratch(invocation.stdin) as scratch:
            try:
                proc = subprocess.Popen(
                    list(invocation.argv),
                    stdin=scratch.stdin,
                    stdout=subprocess.PIPE,
                    stderr=scratch.stderr,
                    cwd=scratch.cwd,
                    start_new_session=True,
                )
            except OSError as exc:
                raise self._spawn_error(exc) from exc
            self._count(started=1, in_flight=1)
            try:
                try:
                    out, _ = proc.communicate(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self._count(timed_out=1)
                    raise self._timeout_error(timeout) from None
                except BaseException:
                    self._count(cancelled=1)
                    raise
            finally:
                _stop_group_sync(proc, self.kill_grace)
                self._count(in_flight=-1)
            try:
                run.feed(out)
                run.close()
                completion = self.outcome(run, proc.returncode, scratch.stderr_tail(), request)
            except ProviderError:
                self._count(failed=1)
                raise
        self._count(succeeded=1)
        return completion

    def __repr__(self) -> str:
        model = f" model={self.model!r}" if self.model else ""
        return f"<{type(self).__name__} {self.name!r} binary={self.binary!r}{model} timeout={self.timeout:g}>"
