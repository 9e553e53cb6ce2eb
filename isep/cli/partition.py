"""isep-partition: decide which layers of an index go to the base, lib and app parts."""
from __future__ import annotations

import sys
from typing import Optional

import typer

from ..archive import load_json
from ..deltapack import open_reference_store, shipping_lines, shipping_plan
from ..limits import INDEX_CAP, PLAN_CAP, parse_delta_memory
from ..partition import make_plan, summary_lines
from ..plancheck import check_index
from .common import (
    BaseOption,
    Compression,
    CompressOption,
    LibOption,
    RenameOption,
    Ui,
    command,
    input_argument,
    launch,
    new_app,
    open_input,
    read_renames,
    resolve_refs,
    write_json,
)

PROG = "isep-partition"
app = new_app(
    "Decide which layers of an isep index go to the base, lib and app parts, and write that plan as "
    "JSON on stdout.",
    "The index (from isep-index) is read from INDEX or stdin; isep-pack --plan executes the plan "
    "without deciding anything again. The base image's diffIDs must be an ordered prefix of every app "
    "image's diffIDs; the lib's must extend the base's and be a prefix of the app's. A table of the "
    "parts goes to stderr when stderr is a terminal or with --summary.",
    "REF is an isep index JSON (FILE or FILE:NAME when it holds several images), the JSON of "
    "docker/podman inspect, an image config JSON, a bundle directory or its isep-bundle.json (its base "
    "or lib part is reused), or the name of an image in the indexed archive itself.")
EXAMPLES = (
    ("dry run: the plan on stdout, the table of parts on stderr",
     "docker save apps/web:2 | isep-index | isep-partition --base base.json --lib lib.json --summary > plan.json"),
    ("the base named by its tag in the same save",
     "docker save apps/web:2 os/base:1 | isep-index | isep-partition --base os/base:1 > plan.json"),
)

IndexArgument = input_argument("INDEX|-", "isep index JSON")


@command(app, PROG, EXAMPLES)
def partition(
    ui: Ui,
    index_file: Optional[str] = IndexArgument,
    base: str = BaseOption,
    lib: Optional[str] = LibOption,
    rename: Optional[str] = RenameOption,
    compress: Compression = CompressOption,
    delta_from: Optional[str] = typer.Option(None, "--delta-from", metavar="STORE", help="Add `shipping` to the plan: how isep-pack --delta-from STORE would ship each layer (referenced, a delta against the named layer unless that is not smaller, or plain) and the memory a delta needs; the table on stderr gains those rows."),
    delta_memory: str = typer.Option("1G", "--delta-memory", metavar="SIZE", help="The memory cap the deltas are planned for (as isep-pack --delta-memory)."),
    summary: bool = typer.Option(False, "--summary", help="Print the parts table on stderr even when it is not a terminal."),
) -> None:
    fh, name = open_input(index_file, "index")
    with fh:
        doc = load_json(_read_up_to(fh, INDEX_CAP + 1), f"index {name}", INDEX_CAP)
    check_index(doc, f"index {name}")
    _drop_unused_fields(doc)
    base_ref, lib_ref = resolve_refs(base, lib, doc["images"])
    plan = make_plan(doc, base_ref, lib_ref, compression=compress.value,
                     renames=read_renames(rename, compress.value))
    if delta_from is not None:
        plan["shipping"] = shipping_plan(plan, open_reference_store(delta_from), parse_delta_memory(delta_memory))
    write_json(plan, cap=PLAN_CAP, what="the plan")
    if (summary or sys.stderr.isatty()) and not ui.quiet:
        lines = summary_lines(plan) + (shipping_lines(plan["shipping"]) if delta_from is not None else [])
        for line in lines:
            print(line, file=sys.stderr)
    for warning in plan["warnings"]:
        ui.warn(warning)


def _drop_unused_fields(index: dict) -> None:
    """The index's member fields pack does not read (xxh3, mtime) stay out of the plan: a fifth of
    what pack --plan holds per member while it parses the plan (docs/formats.md, "Limits")."""
    members = index.get("members")
    for rec in members if isinstance(members, list) else []:
        if isinstance(rec, dict):
            rec.pop("xxh3", None)
            rec.pop("mtime", None)


def _read_up_to(fh, limit: int) -> bytes:
    """At most limit bytes, until end of input: one read of a pipe returns only what it holds."""
    data = bytearray()
    while len(data) < limit:
        piece = fh.read(min(limit - len(data), 1 << 20))
        if not piece:
            break
        data += piece
    return bytes(data)


def main() -> None:
    launch(app, PROG)


if __name__ == "__main__":
    main()
