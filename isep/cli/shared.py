"""Options that several commands share, defined once."""
from __future__ import annotations

from typing import Optional

import typer

from ..partition import load_renames
from ..refs import Ref, read_json_file, resolve_ref, validate_ref

BaseOption = typer.Option(..., "--base", "-b", metavar="REF", help="The base image (see REF above).")
LibOption = typer.Option(None, "--lib", "-l", metavar="REF", help="The lib image, built on the base (optional).")
RenameOption = typer.Option(None, "--rename", "-r", metavar="FILE",
                            help="isula-build rename file: [{\"name\": default, \"rename\": new}].")
CompressOption = typer.Option("zstd", "--compress", "-c", metavar="zstd|gzip|none",
                              help="Compression of the parts (zstd level 3 multi-threaded by default).")


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
