"""isep-index: describe an image archive as JSON."""
from __future__ import annotations

from typing import Optional

import typer

from ..archive import index_stream
from .common import (EXIT_CODES_HELP, Progress, DebugOption, ProgressOption, QuietOption, Ui, VersionOption,
                     input_size, input_source, new_app, run_command, write_json)

PROG = "isep-index"
app = new_app(
    "Read an image archive (docker save, podman save, skopeo, OCI archive) from ARCHIVE or stdin, "
    "once, front to back, and write one JSON document on stdout: the producer format; per image its "
    "tags, config digest, platform and ordered diffIDs; per layer the member holding it, its media "
    "type, size and digests; every member with its offset, size, sha256 and xxh3-128. Every layer's "
    "diffID is checked against the image config. The schema is described in docs/formats.md. "
    + EXIT_CODES_HELP)


@app.command(help=app.info.help)
def index(
    archive: Optional[str] = typer.Argument(None, metavar="ARCHIVE|-", help="Image archive; stdin when omitted or '-'."),
    compact: bool = typer.Option(False, "--compact", help="One line of JSON instead of indented JSON."),
    quiet: bool = QuietOption,
    progress: Progress = ProgressOption,
    debug: bool = DebugOption,
    version: bool = VersionOption,
) -> None:
    ui = Ui(PROG, quiet, progress)

    def body():
        source = input_source(archive, "archive")
        with ui.bar(input_size(archive), "index") as tick:
            doc = index_stream(source) if tick is None else index_stream(source, progress=tick)
        write_json(doc, compact=compact)

    run_command(PROG, debug, body)


def main() -> None:
    app(prog_name=PROG)


if __name__ == "__main__":
    main()
