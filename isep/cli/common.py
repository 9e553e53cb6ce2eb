"""What every isep command shares: the command decorator with the common options, input/output,
progress, and the one place where exceptions become a one-line message and an exit code."""
from __future__ import annotations

import enum
import gc
import inspect
import json
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
import time
import traceback
import typing
from contextlib import contextmanager
from typing import Any, Callable, Optional, Sequence

import typer

from .. import __version__
from ..files import write_all
from ..errors import EnvironmentFailure, ExitStatus, IsepError, UsageError, os_error
from ..jsondoc import encode_document
from ..limits import check_document_size
from ..partition import load_renames
from ..refs import Ref, read_json_file, resolve_ref, validate_ref
from ..signals import raise_interrupted, signals_deferred
from ..tarstream import Source

EXIT_CODES_HELP = "Exit status: " + "; ".join(f"{s.value} {s.meaning}" for s in ExitStatus) + "."


class Progress(str, enum.Enum):
    auto = "auto"
    never = "never"
    always = "always"


class Compression(str, enum.Enum):
    zstd = "zstd"
    gzip = "gzip"
    none = "none"


def new_app(summary: str, *details: str) -> typer.Typer:
    """A Typer app whose help is a one-sentence summary, paragraphs of details, then the exit codes."""
    help_text = "\n\n".join((summary, *details, EXIT_CODES_HELP))
    return typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=help_text,
                       context_settings={"help_option_names": ["-h", "--help"]}, rich_markup_mode=None)


def examples_epilog(examples: Sequence[tuple[str, str]]) -> str:
    """--help's EXAMPLES block; \\b keeps click from rewrapping the commands."""
    lines = ["\b", "Examples:"]
    for comment, shell in examples:
        lines += [f"  # {comment}", f"  {shell}"]
    return "\n".join(lines)


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
BaseOption = typer.Option(..., "--base", "-b", metavar="REF", help="The base image (see REF above).")
LibOption = typer.Option(None, "--lib", "-l", metavar="REF", help="The lib image, built on the base (optional).")
RenameOption = typer.Option(None, "--rename", "-r", metavar="FILE",
                            help="isula-build rename file: [{\"name\": default, \"rename\": new}].")
CompressOption = typer.Option(Compression.zstd, "--compress", "-c",
                              help="Compression of the parts (zstd level 3 multi-threaded by default).")
InsecureOption = typer.Option(False, "--insecure",
                              help="oci://: reach a registry that is not on a loopback address over plain HTTP "
                                   "(without it: TLS; a loopback registry is always reached over plain HTTP).")
MirrorOption = typer.Option(None, "--mirror", metavar="HOST[:PORT]",
                            help="oci://: a registry mirror or pull-through cache (HOST[:PORT] or an http(s) URL) "
                                 "tried first for every blob; the tag is still resolved by the registry itself.")


def input_argument(metavar: str, what: str):
    """The positional input of a filter: a file, or stdin when omitted or '-'."""
    return typer.Argument(None, metavar=metavar, help=f"{what}; stdin when omitted or '-'.")


ArchiveArgument = input_argument("ARCHIVE|-", "Image archive")


def command(app: typer.Typer, prog: str, examples: Sequence[tuple[str, str]], *, quiet: bool = True,
            progress: bool = False) -> Callable:
    """Register the decorated function as APP's command, with the options every command shares
    (-q/--quiet when QUIET, --progress when PROGRESS, --debug, -V/--version) and run_command around it.
    The function declares only its own options, and a parameter `ui` to receive the Ui; it returns
    an ExitStatus, or None for success."""
    def register(func: Callable[..., Optional[int]]) -> Callable[..., None]:
        signature = inspect.signature(func)
        takes_ui = "ui" in signature.parameters
        hints = typing.get_type_hints(func)  # typer needs the types themselves, not postponed strings
        own = [p.replace(annotation=hints.get(p.name, p.annotation))
               for p in signature.parameters.values() if p.name != "ui"]
        params = own + _shared_parameters(quiet, progress)

        def run(**values) -> None:
            debug = values.pop("debug")
            values.pop("version")
            ui = Ui(prog, values.pop("quiet", False), values.pop("progress", Progress.auto))
            if takes_ui:
                values["ui"] = ui
            run_command(prog, debug, lambda: func(**values))

        run.__name__, run.__qualname__, run.__doc__ = func.__name__, func.__qualname__, func.__doc__
        run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in params}
        app.command(help=app.info.help, epilog=examples_epilog(examples))(run)
        return run
    return register


def _shared_parameters(quiet: bool, progress: bool) -> list[inspect.Parameter]:
    def option(name: str, annotation: type, info) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation)
    shared = [option("quiet", bool, QuietOption)] if quiet else []
    shared += [option("progress", Progress, ProgressOption)] if progress else []
    return shared + [option("debug", bool, DebugOption), option("version", bool, VersionOption)]


# click's exceptions, whichever click typer uses (its own copy from typer 0.26 on, the click package before)
_CLICK_ERROR: Any = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def launch(app: typer.Typer, prog: str) -> None:
    """The console-script entry point: run APP; a bad option or argument is one line and exit 2,
    like every other error."""
    guard_standard_streams()
    # What the imports made (modules, classes, functions) lives until exit: outside the cyclic
    # collector, no collection walks it again, and neither does the interpreter's exit: 10-14 ms of
    # a 0.6 s pack (bench/RESULTS.md, 2026-11-30). Frozen objects are still freed by refcounting.
    gc.freeze()
    try:
        status = app(prog_name=prog, standalone_mode=False)
    except _CLICK_ERROR as exc:
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path.replace(" ", "-") if ctx else prog  # `isep pack` reports as isep-pack
        print(f"{where}: error: {one_line(exc.format_message())}", file=sys.stderr, flush=True)
        status = exc.exit_code
    except typer.Abort:  # ^C while click parsed the options (click < 8.2)
        status = ExitStatus.INTERRUPTED
    except BrokenPipeError:  # --help into `head`
        _silence_stdout()
        status = ExitStatus.BROKEN_PIPE
    except OSError as exc:  # --help or --version into a closed or full stdout
        _silence_stdout()
        reason = "it is closed" if "stdout" in _closed_streams else exc.strerror or str(exc)
        print(f"{prog}: error: cannot write to stdout: {reason}", file=sys.stderr, flush=True)
        status = ExitStatus.ENVIRONMENT
    sys.exit(int(status or 0))


_closed_streams: set[str] = set()  # the standard streams the command was started without


def guard_standard_streams() -> None:
    """A standard stream closed by the caller (`<&-`, `>&-`, `2>&-`) gets /dev/null on its
    descriptor, so that no file isep opens later takes that number (a part read as stdin, messages
    written into an output). stdin and stdout get it the wrong way round, so that any use fails (EBADF)
    as on a closed descriptor; the commands check first and say so (exit 3). A closed stderr
    swallows the messages; the exit status is unchanged."""
    for fd, name, flags in ((0, "stdin", os.O_WRONLY), (1, "stdout", os.O_RDONLY), (2, "stderr", os.O_WRONLY)):
        if getattr(sys, name) is not None:  # Python sets None for a descriptor closed at startup
            continue
        try:
            os.fstat(fd)
            continue  # already taken by something else: leave it
        except OSError:
            pass
        null = os.open(os.devnull, flags)
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
        setattr(sys, name, open(fd, "r" if name == "stdin" else "w", closefd=False))
        _closed_streams.add(name)


def require_stream(name: str, what: str) -> None:
    """EnvironmentFailure when the command needs stdin or stdout (NAME) and was started without it."""
    if name in _closed_streams:
        raise EnvironmentFailure(f"{name} is closed, and {what} goes through it")


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
    def bar(self, total: Optional[int], what: str):
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

    @staticmethod
    def adding(tick: Optional[Callable[[int], None]]) -> Optional[Callable[[int], None]]:
        """A bar's callable(bytes_done) fed by increments (as the registry client reports them)."""
        if tick is None:
            return None
        done = [0]

        def add(count: int) -> None:
            done[0] += count
            tick(done[0])
        return add

    def elapsed(self) -> float:
        return time.monotonic() - self.started


_scratch: list[str] = []  # temporary paths of this command, removed by run_command whatever happens


def registry_client(host: str, **options):
    """A client for a registry. Its module, and the HTTP stack under it (http.client, ssl,
    urllib.request: ~15 ms of start-up), are imported here, by the commands that reach a registry,
    not by every local pack, join and verify (a small release's join is start-up bound)."""
    from ..registry import RegistryClient
    return RegistryClient(host, **options)


def scratch_dir(prefix: str, parent: Optional[str] = None) -> str:
    """A new temporary directory that lives until the command ends."""
    with signals_deferred():
        try:
            path = tempfile.mkdtemp(prefix=prefix, dir=parent)
        except OSError as exc:
            raise os_error(exc, f"cannot create a temporary directory in {parent or tempfile.gettempdir()}") from None
        _scratch.append(path)
    return path


def scratch_file(prefix: str, parent: str, what: str) -> tuple[int, str]:
    """A new temporary file (descriptor, path) in PARENT for WHAT (named in errors); removed when the
    command ends unless renamed away."""
    with signals_deferred():
        try:
            fd, path = tempfile.mkstemp(prefix=prefix, dir=parent)
        except OSError as exc:
            raise os_error(exc, f"cannot write {what}") from None
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
    """After EPIPE or a failed write, point stdout at /dev/null so that the interpreter's final
    flush stays quiet."""
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
        require_stream("stdin", f"the {what}")
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
    return stat.S_ISFIFO(st.st_mode)


def stdout_binary():
    require_stream("stdout", "the output")
    if sys.stdout.isatty():
        raise UsageError("refusing to write binary data to a terminal; redirect stdout or use -o")
    return sys.stdout.buffer


def write_json(doc, *, compact: bool = False, cap: Optional[int] = None, what: str = "the output") -> None:
    """doc on stdout; with cap (an index or a plan: member records one per line), refused before a
    byte is written when its readers would refuse it."""
    require_stream("stdout", "the JSON output")
    if cap is not None and not compact:
        data: bytes | bytearray = encode_document(doc, cap, what)
    else:
        text = json.dumps(doc, separators=(",", ":")) if compact else json.dumps(doc, indent=1)
        if cap is not None:
            check_document_size(len(text), cap, what)  # ASCII: json.dumps escapes everything else
        data = (text + "\n").encode()
    sys.stdout.flush()
    # every byte, or BrokenPipeError: a write cut short by a reader going away returns a short count
    write_all(sys.stdout.buffer, data)
    sys.stdout.buffer.flush()


def resolve_refs(base: str, lib: Optional[str], archive_images=None) -> tuple[Ref, Optional[Ref]]:
    """--base and --lib as Refs; image names are looked up in the archive's images when given."""
    cands = None if archive_images is None else [(im.get("tags") or [], im.get("diff_ids") or [])
                                                  for im in archive_images]
    base_ref = validate_ref(resolve_ref(base, "--base", cands), "--base")
    lib_ref = None if lib is None else validate_ref(resolve_ref(lib, "--lib", cands), "--lib")
    return base_ref, lib_ref


def read_renames(path: Optional[str], compression: str) -> dict[str, str]:
    if path is None:
        return {}
    return load_renames(read_json_file(path, "--rename"), compression)
