"""Man pages and the README's exit-code table, generated from the command definitions and the
ExitStatus enum, so that they cannot drift from --help.

    python -m isep.cli.manpage man/ README.md    # write man/isep*.1 and README.md's exit-code table

The pages are built from what the commands declare (option names, explicit metavars, choices, help
texts), never from click's rendering of them, whose spelling changes between typer versions.
"""
from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path
from typing import Optional

import typer

from .. import __version__
from ..errors import ExitStatus
from .common import EXIT_CODES_HELP

PAGES = ("index", "partition", "pack", "verify", "join", "prune", "push", "demo")
README_TABLE_HEADING = "## Exit codes"


def _escape(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + line) if line.startswith((".", "'")) else line for line in text.splitlines())


def _module(name: str):
    return importlib.import_module(f"isep.cli.{name}")


def _metavar(param) -> str:
    """An option's or argument's value placeholder: its declared metavar, its choices, or its name."""
    if param.metavar:
        return param.metavar
    choices = getattr(param.type, "choices", None)
    if choices:
        return "|".join(str(c) for c in choices)
    return param.name.upper()


def _option_names(param) -> str:
    names = ", ".join(sorted(param.opts, key=lambda o: (o.startswith("--"), o)))
    if getattr(param, "is_flag", False) or getattr(param, "count", False):
        return names
    return f"{names} {_metavar(param)}"


def _synopsis(params) -> str:
    pieces = ["[OPTIONS]"]
    for param in params:
        if param.param_type_name == "argument":
            pieces.append(_metavar(param) if param.required else f"[{_metavar(param)}]")
    return " ".join(pieces)


def _description(help_text: str) -> list[str]:
    paragraphs = [p.strip() for p in help_text.split("\n\n") if p.strip() and p.strip() != EXIT_CODES_HELP]
    lines: list[str] = []
    for paragraph in paragraphs:
        lines += ([".PP"] if lines else []) + [_escape(" ".join(paragraph.split()))]
    return lines


def _declared_help(module) -> dict[str, str]:
    """Each parameter's help as the command declares it (click's Argument keeps no help of its own
    in every click version typer runs on)."""
    callback = module.app.registered_commands[0].callback
    return {name: getattr(p.default, "help", None) or ""
            for name, p in inspect.signature(callback).parameters.items()}


def _options(params, declared: dict[str, str]) -> list[str]:
    lines: list[str] = []
    for param in params:
        if getattr(param, "hidden", False):
            continue
        help_text = (declared.get(param.name) or getattr(param, "help", None) or "").strip()
        if param.param_type_name == "option" and param.required:
            help_text += " Required."
        names = _option_names(param) if param.param_type_name == "option" else _metavar(param)
        lines += [".TP", f".B {_escape(names)}", _escape(help_text.strip())]
    return lines


def exit_status_lines() -> list[str]:
    """The EXIT STATUS section's body: one tagged paragraph per ExitStatus member."""
    lines: list[str] = []
    for status in ExitStatus:
        lines += [".TP", f".B {status.value}", _escape(status.meaning)]
    return lines


def _examples(examples) -> list[str]:
    lines: list[str] = []
    for comment, shell in examples:
        lines += [".PP", _escape(comment[0].upper() + comment[1:] + ":"), ".RS 4", ".nf",
                  f"\\fB{_escape(shell)}\\fR", ".fi", ".RE"]
    return lines


def render(name: str) -> str:
    prog = f"isep-{name}"
    module = _module(name)
    cmd = typer.main.get_command(module.app)
    ctx = cmd.context_class(cmd, info_name=prog, **cmd.context_settings)
    params = cmd.get_params(ctx)
    summary = (module.__doc__ or "").split(":", 1)[-1].strip().rstrip(".")
    lines = [f'.TH {prog.upper()} 1 "" "isep {__version__}" "isep manual"', ".SH NAME",
             f"{_escape(prog)} \\- {_escape(summary[0].lower() + summary[1:])}", ".SH SYNOPSIS",
             f".B {_escape(prog)}", _escape(_synopsis(params)), ".SH DESCRIPTION", *_description(module.app.info.help or ""),
             ".SH OPTIONS", *_options(params, _declared_help(module)), ".SH EXIT STATUS", *exit_status_lines(),
             ".SH EXAMPLES", *_examples(module.EXAMPLES), ".SH SEE ALSO",
             ", ".join(f"\\fBisep\\-{p}\\fR(1)" for p in PAGES if p != name)
             + "; docs/formats.md (the index, plan and bundle schemas)", ""]
    return "\n".join(lines)


def render_umbrella() -> str:
    return "\n".join([
        f'.TH ISEP 1 "" "isep {__version__}" "isep manual"', ".SH NAME",
        "isep \\- split container image archives into base, lib and app parts, and join them back",
        ".SH SYNOPSIS", ".B isep", "COMMAND [ARGS]...", ".SH DESCRIPTION",
        "\\fBisep COMMAND\\fR runs \\fBisep\\-COMMAND\\fR: " + ", ".join(f"\\fB{p}\\fR" for p in PAGES) + ".",
        ".SH EXIT STATUS", "That of the command run:", *exit_status_lines(),
        ".SH EXAMPLES", *_examples([("the same as isep-index base.tar", "isep index base.tar")]),
        ".SH SEE ALSO", ", ".join(f"\\fBisep\\-{p}\\fR(1)" for p in PAGES), ""])


def readme_exit_table() -> str:
    """The README's exit-code table (markdown), one row per ExitStatus member."""
    rows = ["| code | meaning |", "|---|---|"]
    rows += [f"| {s.value} | {s.meaning.replace('|', chr(92) + '|')} |" for s in ExitStatus]
    return "\n".join(rows) + "\n"


def update_readme(text: str) -> str:
    """TEXT with the table under its '## Exit codes' heading replaced by readme_exit_table()."""
    head, found, tail = text.partition(README_TABLE_HEADING + "\n\n")
    if not found:
        raise ValueError(f"no '{README_TABLE_HEADING}' heading followed by a table")
    lines = tail.split("\n")
    table_end = next(i for i, line in enumerate(lines) if not line.startswith("|"))
    return head + found + readme_exit_table() + "\n".join(lines[table_end:])


def main(argv: Optional[list[str]] = None) -> None:
    args = argv if argv is not None else sys.argv[1:]
    out = Path(args[0] if args else "man")
    out.mkdir(parents=True, exist_ok=True)
    for name in PAGES:
        (out / f"isep-{name}.1").write_text(render(name))
    (out / "isep.1").write_text(render_umbrella())
    if len(args) > 1:
        readme = Path(args[1])
        readme.write_text(update_readme(readme.read_text()))


if __name__ == "__main__":
    main()
