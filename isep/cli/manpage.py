"""Man pages generated from the command definitions, so that they cannot drift from --help.

    python -m isep.cli.manpage man/        # write man/isep-*.1
"""
from __future__ import annotations

import sys
from pathlib import Path

import typer

from .. import __version__
from .common import EXIT_CODES_HELP

PAGES = ("index", "partition", "pack", "verify", "join", "demo")


def _escape(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + line) if line.startswith((".", "'")) else line for line in text.splitlines())


def _command(name: str):
    module = __import__(f"isep.cli.{name}", fromlist=["app"])
    return typer.main.get_command(module.app)


def _help(name: str) -> str:
    module = __import__(f"isep.cli.{name}", fromlist=["app"])
    return module.app.info.help or ""


def render(name: str) -> str:
    prog = f"isep-{name}"
    cmd = _command(name)
    ctx = cmd.context_class(cmd, info_name=prog)
    usage = " ".join(cmd.collect_usage_pieces(ctx))
    description = _help(name).replace(EXIT_CODES_HELP, "").strip()
    module = __import__(f"isep.cli.{name}", fromlist=["app"])
    summary = (module.__doc__ or "").split(":", 1)[-1].strip().rstrip(".")
    lines = [f'.TH {prog.upper()} 1 "" "isep {__version__}" "isep manual"', ".SH NAME",
             f"{_escape(prog)} \\- {_escape(summary[0].lower() + summary[1:])}", ".SH SYNOPSIS",
             f".B {_escape(prog)}", _escape(usage), ".SH DESCRIPTION", _escape(description), ".SH OPTIONS"]
    for param in cmd.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None:
            continue
        names, help_text = record
        lines += [".TP", f".B {_escape(names)}", _escape(help_text or "")]
    lines += [".SH EXIT STATUS", _escape(EXIT_CODES_HELP.replace("Exit status: ", "")),
              ".SH SEE ALSO", ", ".join(f"\\fBisep\\-{p}\\fR(1)" for p in PAGES if p != name),
              "; docs/formats.md (the index, plan and bundle schemas)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    out = Path((argv or sys.argv[1:] or ["man"])[0])
    out.mkdir(parents=True, exist_ok=True)
    for name in PAGES:
        (out / f"isep-{name}.1").write_text(render(name))
    (out / "isep.1").write_text(
        f'.TH ISEP 1 "" "isep {__version__}" "isep manual"\n.SH NAME\nisep \\- split container image '
        f"archives into base, lib and app parts, and join them back\n.SH SYNOPSIS\n.B isep\n"
        f"COMMAND [ARGS]...\n.SH DESCRIPTION\n\\fBisep COMMAND\\fR runs \\fBisep\\-COMMAND\\fR: "
        + ", ".join(f"\\fB{p}\\fR" for p in PAGES) + ".\n.SH SEE ALSO\n"
        + ", ".join(f"\\fBisep\\-{p}\\fR(1)" for p in PAGES) + "\n")


if __name__ == "__main__":
    main()
