"""isep-partition: decide which layers of an index go to the base, lib and app parts."""
from __future__ import annotations

import sys
from typing import Optional

import typer

from ..archive import load_json
from ..errors import BadInput
from ..partition import make_plan, summary_lines
from .common import (EXIT_CODES_HELP, DebugOption, QuietOption, Ui, VersionOption, new_app, open_input,
                     run_command, write_json)
from .shared import BaseOption, CompressOption, LibOption, RenameOption, resolve_refs, read_renames

PROG = "isep-partition"
app = new_app(
    "Read an isep index (from isep-index) from INDEX or stdin and write a plan JSON on stdout that "
    "isep-pack --plan executes without deciding anything again. The base image's diffIDs must be an "
    "ordered prefix of every app image's diffIDs; the lib's must extend the base's and be a prefix of "
    "the app's. REF is an isep index JSON (FILE or FILE:NAME when it holds several images), the JSON of "
    "docker/podman inspect, an image config JSON, a bundle directory or its isep-bundle.json (its base "
    "or lib part is reused), or the name of an image in the indexed archive itself. A table of the "
    "parts goes to stderr when stderr is a terminal or with --summary. " + EXIT_CODES_HELP)


@app.command(help=app.info.help)
def partition(
    index_file: Optional[str] = typer.Argument(None, metavar="INDEX|-", help="isep index JSON; stdin when omitted or '-'."),
    base: str = BaseOption,
    lib: Optional[str] = LibOption,
    rename: Optional[str] = RenameOption,
    compress: str = CompressOption,
    summary: bool = typer.Option(False, "--summary", help="Print the parts table on stderr even when it is not a terminal."),
    quiet: bool = QuietOption,
    debug: bool = DebugOption,
    version: bool = VersionOption,
) -> None:
    ui = Ui(PROG, quiet)

    def body():
        fh, name = open_input(index_file, "index")
        with fh:
            doc = load_json(fh.read(256 << 20), f"index {name}")
        if not isinstance(doc, dict) or not str(doc.get("schema", "")).startswith("isep-index/"):
            raise BadInput(f"{name} is not an isep index (make one with isep-index)")
        base_ref, lib_ref = resolve_refs(base, lib, doc["images"])
        plan = make_plan(doc, base_ref, lib_ref, compression=compress,
                         renames=read_renames(rename, compress))
        write_json(plan)
        if (summary or sys.stderr.isatty()) and not quiet:
            for line in summary_lines(plan):
                print(line, file=sys.stderr)
        for warning in plan["warnings"]:
            ui.warn(warning)

    run_command(PROG, debug, body)


def main() -> None:
    app(prog_name=PROG)


if __name__ == "__main__":
    main()
