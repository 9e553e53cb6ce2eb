"""isep-join: rebuild a loadable image archive from parts, verified while it streams."""
from __future__ import annotations

import os
from typing import Optional

import typer

from ..errors import UsageError
from ..bundle import isep_part_inputs, isula_part_inputs, open_bundle, select_image
from ..join import JoinOptions, join_parts
from ..stream import receive_stream
from .common import (EXIT_CODES_HELP, Progress, DebugOption, ProgressOption, QuietOption, Ui, VersionOption,
                     input_source, new_app, run_command, scratch_dir, scratch_file, stdout_binary)

PROG = "isep-join"
app = new_app(
    "Write an image archive that docker load, podman load and ctr images import accept, from the "
    "parts of a bundle: BUNDLE is a store directory (isep-bundle.json, or isula-build's `manifest`), or "
    "- for a bundle stream on stdin (from isep-pack -o -). `isep-join STORE -` reads a bundle stream on "
    "stdin and takes the parts it lacks (base, lib) from STORE, matched by file name or by diffIDs. "
    "IMAGE may be omitted when the bundle holds one image; names match as Docker normalises them. "
    "-b/-l/-a name the part files explicitly (as isula-build's load -b/-l). A bundle from a single-image "
    "save joins into the original save byte for byte. Every part's size and sha256 and every layer's "
    "diffID are checked while streaming; the archive's final metadata and end-of-archive marker are "
    "written only after all checks passed, so a failed join leaves an incomplete archive no loader "
    "accepts. A bundle stream is received into a temporary directory (in STORE when writable, else "
    "TMPDIR), removed afterwards. " + EXIT_CODES_HELP)


@app.command(help=app.info.help)
def join(
    bundle: str = typer.Argument(..., metavar="BUNDLE|-", help="Store directory, or - for a bundle stream on stdin."),
    image: Optional[str] = typer.Argument(None, metavar="IMAGE|-", help="Image name; - reads a bundle stream on stdin (with BUNDLE as the local store)."),
    base_part: Optional[str] = typer.Option(None, "--base-part", "-b", metavar="PART", help="Base part file to use."),
    lib_part: Optional[str] = typer.Option(None, "--lib-part", "-l", metavar="PART", help="Lib part file to use."),
    app_part: Optional[str] = typer.Option(None, "--app-part", "-a", metavar="PART", help="App part file to use."),
    image_opt: Optional[str] = typer.Option(None, "--image", "-i", metavar="IMAGE", help="Image name (when IMAGE is -)."),
    output: Optional[str] = typer.Option(None, "--output", "-o", metavar="FILE", help="Write to FILE (atomically) instead of stdout."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the part hash check (isula's --no-check); diffIDs are still checked."),
    trust: Optional[str] = typer.Option(None, "--trust", metavar="ALLOWED_SIGNERS", help="Refuse the bundle unless isep-bundle.json is signed (isep-pack --sign) by a key in this ssh-keygen allowed-signers file (for a stream with STORE: both manifests)."),
    normalize: bool = typer.Option(False, "--normalize", help="Write a canonical Docker-25-style archive (manifest.json, OCI index with one entry, layers and config as blobs/sha256/<digest>, regular files only) instead of the original layout: for loaders that choke on symlinks, on several index entries or on a producer's quirks. Not byte-exact."),
    quiet: bool = QuietOption,
    progress: Progress = ProgressOption,
    debug: bool = DebugOption,
    version: bool = VersionOption,
) -> None:
    ui = Ui(PROG, quiet, progress)

    def body():
        stream_in = bundle == "-" or image == "-"
        name = image_opt if image == "-" else image
        if image == "-" and app_part == "-":
            raise UsageError("stdin can carry the bundle stream or the app part, not both")
        overrides = {r: p for r, p in (("base", base_part), ("lib", lib_part), ("app", app_part)) if p}
        if trust is not None and no_verify:
            raise UsageError("--trust relies on the part hashes: leave out --no-verify")
        if no_verify:
            ui.warn("--no-verify: part hashes are not checked (layer diffIDs still are)")
        if stream_in:
            store_dir = None if bundle == "-" else bundle
            received = receive_stream(input_source("-", "bundle stream"), _receive_dir(store_dir))
            extra = [open_bundle(store_dir)] if store_dir else []
            extra = [b for b in extra if b.kind == "isep"]
            if trust is not None:
                for b in [received] + extra:
                    b.check_signature(trust)
            chosen = select_image(received.doc["images"], name, "the bundle stream")
            parts = isep_part_inputs(received, chosen, overrides, extra)
        else:
            opened = open_bundle(bundle)
            if trust is not None:
                opened.check_signature(trust)
            if app_part == "-":
                overrides["app"] = "-"
            if opened.kind == "isula":
                chosen = None
                parts = isula_part_inputs(opened, name, overrides)
            else:
                chosen = select_image(opened.doc["images"], name, bundle)
                parts = isep_part_inputs(opened, chosen, overrides)
        options = JoinOptions(verify_parts=not no_verify, warn=ui.warn, normalize=normalize)
        trailer = (chosen or {}).get("trailer_size", 1024)
        _write(output, parts, chosen, options, trailer, ui)

    run_command(PROG, debug, body)


def _receive_dir(store_dir: Optional[str]) -> str:
    if store_dir and os.access(store_dir, os.W_OK):
        return scratch_dir(".isep-tmp-recv-", store_dir)
    return scratch_dir("isep-recv-")


def _write(output, parts, chosen, options, trailer, ui: Ui) -> None:
    if output is None:
        out = stdout_binary()
        with ui.bar(None, "join") as tick:
            options.progress = tick
            checks = join_parts(parts, out, chosen, options, trailer_size=trailer)
        out.flush()
    else:
        directory = os.path.dirname(os.path.abspath(output))
        fd, temp = scratch_file(".isep-tmp-", directory)
        with os.fdopen(fd, "wb") as out:
            checks = join_parts(parts, out, chosen, options, trailer_size=trailer)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, output)
    ui.info(f"{len(checks['parts'])} part(s) checked, {checks['layers']} layer diffIDs verified")


def main() -> None:
    app(prog_name=PROG)


if __name__ == "__main__":
    main()
