"""isep-index: describe an image archive as JSON."""
from __future__ import annotations

from typing import Optional

import typer

from ..archive import index_stream
from ..limits import INDEX_CAP
from .common import (
    ArchiveArgument,
    Ui,
    command,
    input_size,
    input_source,
    launch,
    new_app,
    write_json,
)

PROG = "isep-index"
app = new_app(
    "Describe an image archive (docker save, podman save, skopeo, OCI archive) as one JSON document "
    "on stdout.",
    "The archive is read from ARCHIVE or stdin once, front to back. The document holds the producer "
    "format; per image its tags, config digest, platform and ordered diffIDs; per layer the member "
    "holding it, its media type, size and digests; every member with its offset, size, sha256 and "
    "xxh3-128. Every layer's diffID is checked against the image config. The schema is described in "
    "docs/formats.md.")
EXAMPLES = (
    ("describe a save as it streams out of docker", "docker save os/base:1 | isep-index > base.json"),
    ("one line of JSON from a file", "isep-index --compact app.tar"),
)


@command(app, PROG, EXAMPLES, progress=True)
def index(
    ui: Ui,
    archive: Optional[str] = ArchiveArgument,
    compact: bool = typer.Option(False, "--compact", help="One line of JSON instead of indented JSON."),
) -> None:
    source = input_source(archive, "archive")
    with ui.bar(input_size(archive), "index") as tick:
        doc = index_stream(source) if tick is None else index_stream(source, progress=tick)
    write_json(doc, compact=compact, cap=INDEX_CAP, what="the index")


def main() -> None:
    launch(app, PROG)


if __name__ == "__main__":
    main()
