"""isep-join: rebuild a loadable image archive from parts, verified while it streams."""
from __future__ import annotations

import os
from typing import Optional, cast

import typer

from ..errors import UsageError
from ..bundle import isep_part_inputs, isula_part_inputs, open_bundle, select_image
from ..join import JoinOptions, join_parts
from ..refs import Held, resolve_have
from ..thin import covered_layers
from ..stream import receive_stream
from .common import (
    Ui,
    command,
    input_source,
    launch,
    new_app,
    scratch_dir,
    scratch_file,
    stdout_binary,
)

PROG = "isep-join"
app = new_app(
    "Write an image archive that docker load, podman load and ctr images import accept, from the "
    "parts of a bundle.",
    "BUNDLE is a store directory (isep-bundle.json, or isula-build's `manifest`), or - for a bundle "
    "stream on stdin (from isep-pack -o -). `isep-join STORE -` reads a bundle stream on stdin and "
    "takes the parts it lacks (base, lib) from STORE, matched by file name or by diffIDs. IMAGE may be "
    "omitted when the bundle holds one image; names match as Docker normalises them. -b/-l/-a name "
    "the part files explicitly (as isula-build's load -b/-l).",
    "A bundle from a single-image save joins into the original save byte for byte. Every part's size "
    "and sha256 and every layer's diffID are checked while streaming; the archive's final metadata "
    "and end-of-archive marker are written only after all checks passed, so a failed join leaves an "
    "incomplete archive no loader accepts. A bundle stream is received into a temporary directory (in "
    "STORE when writable, else TMPDIR), removed afterwards.")
EXAMPLES = (
    ("load an image from a store", "isep-join store/ apps/web:2 | docker load"),
    ("on a device: a received app part joined with the base and lib it holds",
     "isep-join /srv/isep - < update.stream | podman load"),
    ("write the archive to a file (atomically) instead of stdout", "isep-join store/ apps/web:2 -o web.tar"),
    ("on a device that keeps no parts: only the layers docker lacks",
     "isep-join - --have <(docker inspect os/base:1 rt/jre:17) < app.stream | docker load"),
)


@command(app, PROG, EXAMPLES, progress=True)
def join(
    ui: Ui,
    bundle: str = typer.Argument(..., metavar="BUNDLE|-", help="Store directory, or - for a bundle stream on stdin."),
    image: Optional[str] = typer.Argument(None, metavar="IMAGE|-", help="Image name; - reads a bundle stream on stdin (with BUNDLE as the local store)."),
    base_part: Optional[str] = typer.Option(None, "--base-part", "-b", metavar="PART", help="Base part file to use."),
    lib_part: Optional[str] = typer.Option(None, "--lib-part", "-l", metavar="PART", help="Lib part file to use."),
    app_part: Optional[str] = typer.Option(None, "--app-part", "-a", metavar="PART", help="App part file to use."),
    image_opt: Optional[str] = typer.Option(None, "--image", "-i", metavar="IMAGE", help="Image name (when IMAGE is -)."),
    output: Optional[str] = typer.Option(None, "--output", "-o", metavar="FILE", help="Write to FILE (atomically) instead of stdout."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the part hash check (isula's --no-check); diffIDs are still checked."),
    trust: Optional[str] = typer.Option(None, "--trust", metavar="ALLOWED_SIGNERS", help="Refuse the bundle unless isep-bundle.json is signed (isep-pack --sign) by a key in this ssh-keygen allowed-signers file (for a stream with STORE: both manifests)."),
    have: Optional[list[str]] = typer.Option(None, "--have", metavar="REF", help="What the loading engine already holds (repeatable): `docker inspect` JSON of one or more images, an isep index, a bundle directory or its isep-bundle.json, an image config; FILE:NAME picks one image. The archive leaves out the layer files of every layer whose whole chain REF shows, so base and lib parts need not be at hand; a layer neither a part nor REF covers is refused before anything is written (exit 6). For Docker 20.10+, Docker's containerd store and ctr images import; podman refuses such archives, so podman inspect JSON is refused."),
    normalize: bool = typer.Option(False, "--normalize", help="Write a canonical Docker-25-style archive (manifest.json, OCI index with one entry, layers and config as blobs/sha256/<digest>, regular files only) instead of the original layout: for loaders that choke on symlinks, on several index entries or on a producer's quirks. Not byte-exact."),
) -> None:
    name = image_opt if image == "-" else image
    if image == "-" and app_part == "-":
        raise UsageError("stdin can carry the bundle stream or the app part, not both")
    overrides = {r: p for r, p in (("base", base_part), ("lib", lib_part), ("app", app_part)) if p}
    if trust is not None and no_verify:
        raise UsageError("--trust relies on the part hashes: leave out --no-verify")
    held = _resolve_have(have or [], normalize)
    if no_verify:
        ui.warn("--no-verify: part hashes are not checked (layer diffIDs still are)")
    if bundle == "-" or image == "-":
        chosen, parts = _stream_parts(None if bundle == "-" else bundle, name, overrides, trust, held)
    else:
        if app_part == "-":
            overrides["app"] = "-"
        chosen, parts = _store_parts(bundle, name, overrides, trust, held)
    options = JoinOptions(verify_parts=not no_verify, warn=ui.warn, normalize=normalize)
    if held is not None and chosen is not None:
        options.thin_layers = covered_layers(chosen["diff_ids"], held)
    trailer = (chosen or {}).get("trailer_size", 1024)
    _write(output, parts, chosen, options, trailer, ui)


def _resolve_have(refs: list[str], normalize: bool) -> Optional[list[Held]]:
    if not refs:
        return None
    if normalize:
        raise UsageError("--normalize rewrites every layer under its blob name: it cannot leave layers out (--have)")
    return [held for ref in refs for held in resolve_have(ref)]


def _stream_parts(store_dir: Optional[str], name: Optional[str], overrides: dict, trust: Optional[str],
                  held: Optional[list[Held]]):
    """(image, part inputs) of a bundle stream on stdin, with the parts it lacks from STORE."""
    received = receive_stream(input_source("-", "bundle stream"), _receive_dir(store_dir))
    extra = [open_bundle(store_dir)] if store_dir else []
    extra = [b for b in extra if b.kind == "isep"]
    if trust is not None:
        for b in [received, *extra]:
            b.check_signature(trust)
    chosen = select_image(_images(received), name, "the bundle stream")
    return chosen, isep_part_inputs(received, chosen, overrides, extra, have=held)


def _store_parts(bundle: str, name: Optional[str], overrides: dict, trust: Optional[str],
                 held: Optional[list[Held]]):
    """(image, part inputs) of a store directory; the image is None for an isula-build bundle."""
    opened = open_bundle(bundle)
    if trust is not None:
        opened.check_signature(trust)
    if opened.kind == "isula":
        if held is not None:
            raise UsageError("--have needs an isep bundle: an isula-build bundle is joined whole")
        return None, isula_part_inputs(opened, name, overrides)
    chosen = select_image(_images(opened), name, bundle)
    return chosen, isep_part_inputs(opened, chosen, overrides, have=held)


def _images(bundle) -> list:
    return cast(dict, bundle.doc)["images"]  # an isep bundle's manifest was parsed when it was opened


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
    left_out = f", the files of the bottom {options.thin_layers} left out (--have)" if options.thin_layers else ""
    ui.info(f"{len(checks['parts'])} part(s) checked, {checks['layers']} layer diffIDs verified{left_out}")


def main() -> None:
    launch(app, PROG)


if __name__ == "__main__":
    main()
