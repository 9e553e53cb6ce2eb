"""What every isep command shares: options, input/output, progress, and the one place where
exceptions become a one-line message and an exit code."""
from __future__ import annotations

import enum
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from typing import Callable, Optional

import typer

from .. import __version__
from ..errors import EnvironmentFailure, ExitStatus, IsepError, UsageError
from ..signals import raise_interrupted, signals_deferred
from ..tarstream import Source

EXIT_CODES_HELP = (
    "Exit status: 0 success; 1 internal error; 2 usage error; 3 environment (I/O, permissions, disk "
    "full, lock); 4 bad input (not a tar, truncated, malformed JSON, unsupported format); 5 integrity "
    "failure (digest, diffID, size or signature mismatch); 6 the image does not fit the base/lib; "
    "130 interrupted (SIGINT); 141 stdout closed by its reader (no message); 143 terminated (SIGTERM)."
)


class Progress(str, enum.Enum):
    auto = "auto"
    never = "never"
    always = "always"


def new_app(help_text: str) -> typer.Typer:
    return typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=help_text,
                       context_settings={"help_option_names": ["-h", "--help"]}, rich_markup_mode=None)


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"isep {__version__}")
        raise typer.Exit()


QuietOption = typer.Option(False, "--quiet", "-q", help="No progress and no summary on stderr.")
ProgressOption = typer.Option(Progress.auto, "--progress",
                              help="Progress bar on stderr: auto (only on a terminal), never, always.")
DebugOption = typer.Option(False, "--debug", help="Show a traceback on errors.")
VersionOption = typer.Option(False, "--version", "-V", callback=version_callback, is_eager=True,
                             help="Print the version and exit.")


class Ui:
    """Messages and progress on stderr; stdout is for data only."""

    def __init__(self, prog: str, quiet: bool = False, progress: Progress = Progress.auto):
        self.prog = prog
        self.quiet = quiet
        tty = sys.stderr.isatty()
        self.show_progress = not quiet and (progress == Progress.always or (progress == Progress.auto and tty))
        self.started = time.monotonic()

    def info(self, message: str) -> None:
        if not self.quiet:
            print(f"{self.prog}: {message}", file=sys.stderr, flush=True)

    def warn(self, message: str) -> None:
        print(f"{self.prog}: warning: {one_line(message)}", file=sys.stderr, flush=True)

    @contextmanager
    def bar(self, total: int | None, what: str):
        """A callable(bytes_done) that drives a tqdm bar, or a no-op."""
        if not self.show_progress:
            yield None
            return
        from tqdm import tqdm
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=what, file=sys.stderr,
                   leave=False, mininterval=0.5)
        last = [0]

        def update(done: int) -> None:
            if done - last[0] >= 1 << 20:
                bar.update(done - last[0])
                last[0] = done
        try:
            yield update
        finally:
            bar.close()

    def elapsed(self) -> float:
        return time.monotonic() - self.started


_scratch: list[str] = []  # temporary paths of this command, removed by run_command whatever happens


def scratch_dir(prefix: str, parent: Optional[str] = None) -> str:
    """A new temporary directory that lives until the command ends."""
    with signals_deferred():
        path = tempfile.mkdtemp(prefix=prefix, dir=parent)
        _scratch.append(path)
    return path


def scratch_file(prefix: str, parent: str) -> tuple[int, str]:
    """A new temporary file (descriptor, path); removed when the command ends unless renamed away."""
    with signals_deferred():
        fd, path = tempfile.mkstemp(prefix=prefix, dir=parent)
        _scratch.append(path)
    return fd, path


def _remove_scratch() -> None:
    while _scratch:
        path = _scratch.pop()
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except OSError:  # renamed into place: nothing left
                pass


def run_command(prog: str, debug: bool, body: Callable[[], Optional[int]]) -> None:
    """Run a command body; map every failure to one line on stderr and an exit code."""
    signal.signal(signal.SIGTERM, raise_interrupted)
    signal.signal(signal.SIGINT, raise_interrupted)
    status: int = ExitStatus.OK
    try:
        result = body()
        if result is not None:
            status = result
        sys.stdout.flush()
    except BrokenPipeError:  # the reader of stdout went away (`| head`): quiet, as if killed by SIGPIPE
        _silence_stdout()
        status = ExitStatus.BROKEN_PIPE
    except IsepError as exc:
        status = exc.status
        _report(prog, str(exc), debug)
    except MemoryError:
        status = ExitStatus.ENVIRONMENT
        _report(prog, "out of memory", debug)
    except OSError as exc:
        status = ExitStatus.ENVIRONMENT
        _report(prog, f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""), debug)
    except (typer.Exit, SystemExit):
        raise
    except Exception as exc:  # a bug: still one line, with a hint
        status = ExitStatus.INTERNAL
        _report(prog, f"internal error: {type(exc).__name__}: {exc} (run with --debug for a traceback)", debug)
    finally:
        _remove_scratch()
    raise typer.Exit(int(status))


def _silence_stdout() -> None:
    """After EPIPE, point stdout at /dev/null so that the interpreter's final flush stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass


_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(message: str) -> str:
    """A message on one line, its control characters (from names in hostile input) shown escaped,
    so that it can neither break the line nor drive the terminal."""
    message = " ".join(message.split("\n")).strip()
    return _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256
                            else f"\\u{ord(m.group()):04x}", message)


def _report(prog: str, message: str, debug: bool) -> None:
    if debug:
        traceback.print_exc(file=sys.stderr)
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr, flush=True)


def open_input(path: str | None, what: str = "input"):
    """A binary file object for PATH, or stdin for '-' / nothing (refused when it is a terminal)."""
    if path in (None, "-"):
        if sys.stdin.isatty():
            raise UsageError(f"no {what} given and stdin is a terminal; pipe an archive in or name a file")
        return sys.stdin.buffer.raw if hasattr(sys.stdin.buffer, "raw") else sys.stdin.buffer, "stdin"
    if os.path.isdir(path):  # before open(), which fails on a directory (EISDIR)
        raise UsageError(f"{path} is a directory")
    try:
        fh = open(path, "rb", buffering=0)
    except OSError as exc:
        raise EnvironmentFailure(f"cannot open {path}: {exc.strerror}") from None
    return fh, path


def input_source(path: str | None, what: str = "input") -> Source:
    fh, name = open_input(path, what)
    return Source(fh, name=name)


def input_size(path: str | None) -> int | None:
    if path in (None, "-"):
        try:
            st = os.fstat(sys.stdin.fileno())
            return st.st_size if st.st_size and not _is_pipe(st) else None
        except OSError:
            return None
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def _is_pipe(st) -> bool:
    import stat as stat_mod
    return stat_mod.S_ISFIFO(st.st_mode)


def stdout_binary():
    if sys.stdout.isatty():
        raise UsageError("refusing to write binary data to a terminal; redirect stdout or use -o")
    return sys.stdout.buffer


def write_json(doc, *, compact: bool = False) -> None:
    import json
    from ..bundle import write_all
    text = json.dumps(doc, separators=(",", ":")) if compact else json.dumps(doc, indent=1)
    sys.stdout.flush()
    # every byte, or BrokenPipeError: a write cut short by a reader going away returns a short count
    write_all(sys.stdout.buffer, (text + "\n").encode())
    sys.stdout.buffer.flush()
