"""isep-join: rebuild a loadable image archive from parts, verified while it streams."""
from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING, Optional, cast

import typer

from ..errors import UsageError, os_error
from ..registryref import RegistryRef, is_registry_ref
from ..files import FileSink, OutputFile, open_in_place, output_file
from ..limits import parse_delta_memory
from ..names import BUNDLE_MANIFEST
from ..bundle import (Bundle, Store, is_delta_part, isep_part_inputs, isula_part_inputs, open_bundle, open_local_store,
                      select_image)
from ..deltajoin import adopt_rebuilt, check_needs, prepare_delta_parts
from ..join import JoinOptions, join_parts
from ..refs import Held, resolve_have
from ..thin import covered_layers
from ..stream import check_keepable, keep_received, leave_unread_deltas, receive_stream
from .common import (
    InsecureOption,
    MirrorOption,
    Ui,
    command,
    input_source,
    launch,
    new_app,
    registry_client,
    require_stream,
    scratch_dir,
    scratch_file,
    stdout_binary,
)

if TYPE_CHECKING:
    from ..registry import RegistryClient

PROG = "isep-join"
app = new_app(
    "Write an image archive that docker load, podman load and ctr images import accept, from the "
    "parts of a bundle.",
    "BUNDLE is a store directory (isep-bundle.json, or isula-build's `manifest`), or - for a bundle "
    "stream on stdin (from isep-pack -o -). `isep-join STORE -` reads a bundle stream on stdin and "
    "takes the parts it lacks (base, lib) from STORE, matched by file name or by diffIDs; a stream "
    "that carries every part the image needs joins alone (STORE may be missing or empty: a device's "
    "first delivery), and --keep moves the received parts into STORE for the next release. IMAGE may be "
    "omitted when the bundle holds one image; names match as Docker normalises them. -b/-l/-a name "
    "the part files explicitly (as isula-build's load -b/-l). `isep-join oci://HOST/REPO:TAG [STORE]` "
    "pulls a release pushed by isep-push: only the parts (or delta parts) STORE lacks are fetched, "
    "resumably, and kept in STORE (created if missing); without STORE into a temporary directory; "
    "-i names the image.",
    "A bundle from a single-image save joins into the original save byte for byte. Every part's size "
    "and sha256 and every layer's diffID are checked while streaming; the archive's final metadata "
    "and end-of-archive marker are written only after all checks passed, so a failed join leaves an "
    "incomplete archive no loader accepts. A bundle stream is received into a temporary directory (in "
    "STORE when writable, else TMPDIR), removed afterwards unless --keep moved its parts into STORE.")
EXAMPLES = (
    ("load an image from a store", "isep-join store/ apps/web:2 | docker load"),
    ("on a device: a received app part joined with the base and lib it holds",
     "isep-join /srv/isep - < update.stream | podman load"),
    ("a device's first delivery as a stream, kept for the next release",
     "isep-pack app.tar --base base.json -o - | isep-join /var/lib/isep/store - --keep | docker load"),
    ("write the archive to a file (atomically) instead of stdout", "isep-join store/ apps/web:2 -o web.tar"),
    ("on a device: a release from a registry, fetching only what its store lacks",
     "isep-join oci://registry.example:5000/fleet/web:2 /var/lib/isep/store | docker load"),
    ("on a device that keeps no parts: only the layers docker lacks",
     "isep-join - --have <(docker inspect os/base:1 rt/jre:17) < app.stream | docker load"),
)


@command(app, PROG, EXAMPLES, progress=True)
def join(
    ui: Ui,
    bundle: str = typer.Argument(..., metavar="BUNDLE|-", help="Store directory, - for a bundle stream on stdin, or oci://HOST/REPO:TAG for a release in a registry."),
    image: Optional[str] = typer.Argument(None, metavar="IMAGE|-", help="Image name; - reads a bundle stream on stdin (with BUNDLE as the local store); after oci://..., the local STORE."),
    base_part: Optional[str] = typer.Option(None, "--base-part", "-b", metavar="PART", help="Base part file to use."),
    lib_part: Optional[str] = typer.Option(None, "--lib-part", "-l", metavar="PART", help="Lib part file to use."),
    app_part: Optional[str] = typer.Option(None, "--app-part", "-a", metavar="PART", help="App part file to use."),
    image_opt: Optional[str] = typer.Option(None, "--image", "-i", metavar="IMAGE", help="Image name (when IMAGE is -, or with oci://)."),
    output: Optional[str] = typer.Option(None, "--output", "-o", metavar="FILE", help="Write to FILE instead of stdout: a new or regular FILE is replaced atomically when complete; a device or FIFO is written in place; a symbolic link is followed."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the part hash check (isula's --no-check); diffIDs are still checked."),
    trust: Optional[str] = typer.Option(None, "--trust", metavar="ALLOWED_SIGNERS", help="Refuse the bundle unless isep-bundle.json is signed (isep-pack --sign) by a key in this ssh-keygen allowed-signers file (for a stream with STORE: both manifests)."),
    have: Optional[list[str]] = typer.Option(None, "--have", metavar="REF", help="What the loading engine already holds (repeatable): `docker inspect` JSON of one or more images, an isep index, a bundle directory or its isep-bundle.json, an image config; FILE:NAME picks one image. The archive leaves out the layer files of every layer whose whole chain REF shows, so base and lib parts need not be at hand; a layer neither a part nor REF covers is refused before anything is written (exit 6). For Docker 20.10+, Docker's containerd store and ctr images import; podman refuses such archives, so podman inspect JSON is refused."),
    delta_memory: str = typer.Option("1G", "--delta-memory", metavar="SIZE", help="Memory one delta may use while it is applied (as given to isep-pack --delta-memory)."),
    keep: bool = typer.Option(False, "--keep", help="With a bundle stream (STORE -): after a successful join, move the received parts into STORE (created if missing) and merge its isep-bundle.json, written last, so that it holds what the next release's app part needs. Delta parts are kept as the plain parts the join rebuilt; another image's delta part in a multi-image stream is not kept, nor its image, until that image is joined with --keep. A different part under the same name is never replaced: another version of a base or lib (a floating tag rebuilt) is kept beside it, its name suffixed with its chainID. Without --keep STORE is only read."),
    normalize: bool = typer.Option(False, "--normalize", help="Write a canonical Docker-25-style archive (manifest.json, OCI index with one entry, layers and config as blobs/sha256/<digest>, regular files only) instead of the original layout: for loaders that choke on symlinks, on several index entries or on a producer's quirks. Not byte-exact."),
    insecure: bool = InsecureOption,
    mirror: Optional[str] = MirrorOption,
) -> None:
    name = image_opt if image == "-" else image
    if image == "-" and app_part == "-":
        raise UsageError("stdin can carry the bundle stream or the app part, not both")
    overrides = {r: p for r, p in (("base", base_part), ("lib", lib_part), ("app", app_part)) if p}
    if "-" in overrides.values():
        require_stream("stdin", "a part given as -")
    if trust is not None and no_verify:
        raise UsageError("--trust relies on the part hashes: leave out --no-verify")
    held = _resolve_have(have or [], normalize)
    if no_verify:
        ui.warn("--no-verify: part hashes are not checked (layer diffIDs still are)")
    options = JoinOptions(verify_parts=not no_verify, warn=ui.warn, normalize=normalize)
    memory = parse_delta_memory(delta_memory)
    if is_registry_ref(bundle):
        if overrides or image == "-":
            raise UsageError("oci:// joins a release's own parts: no -b/-l/-a, and no stream on stdin")
        ref = RegistryRef.parse(bundle)
        client = registry_client(ref.host, insecure=insecure, mirror=mirror)
        _join_registry(client, ref, image, image_opt, trust, held, output, options, ui, memory)
        return
    if keep and image != "-":
        raise UsageError("--keep needs a bundle stream joined against a store: isep-join STORE - --keep")
    if image == "-" and bundle != "-":
        _join_stream(bundle, name, overrides, trust, held, keep, output, options, ui, memory)
        return
    if bundle == "-":
        _, chosen, parts = _stream_parts(None, name, overrides, trust, held, _receive_dir(None))
    else:
        if app_part == "-":
            overrides["app"] = "-"
        chosen, parts = _store_parts(bundle, name, overrides, trust, held)
    parts = _rebuild(parts, None if bundle == "-" else bundle, memory, keep_in=None)
    _thin(options, chosen, held)
    trailer = (chosen or {}).get("trailer_size", 1024)
    _write(output, parts, chosen, options, trailer, ui)


def _resolve_have(refs: list[str], normalize: bool) -> Optional[list[Held]]:
    if not refs:
        return None
    if normalize:
        raise UsageError("--normalize rewrites every layer under its blob name: it cannot leave layers out (--have)")
    return [held for ref in refs for held in resolve_have(ref)]


def _thin(options: JoinOptions, chosen: Optional[dict], held: Optional[list[Held]]) -> None:
    if held is not None and chosen is not None:
        options.thin_layers = covered_layers(chosen["diff_ids"], held)


def _join_stream(store_dir: str, name: Optional[str], overrides: dict, trust: Optional[str],
                 held: Optional[list[Held]], keep: bool, output: Optional[str], options: JoinOptions,
                 ui: Ui, memory: int) -> None:
    """isep-join STORE - [--keep]: the stream's parts, with those it lacks from STORE; with --keep
    the stream is received inside STORE (created if missing) and its parts then renamed into place."""
    store = Store(store_dir, create=True) if keep else None
    recv_dir = scratch_dir(".isep-tmp-recv-", store.path) if store else _receive_dir(store_dir)
    try:
        received, chosen, parts = _stream_parts(store_dir, name, overrides, trust, held, recv_dir)
        if store is not None:
            check_keepable(store, received, chosen)  # refused before any output, not after it
        _thin(options, chosen, held)
        parts = _rebuild(parts, store_dir, memory, keep_in=None if store is None else store.path)
        _write(output, parts, chosen, options, chosen.get("trailer_size", 1024), ui)
        if store is not None:  # the store keeps each release's part plain: deltas never chain
            adopt_rebuilt(received, parts)
            _keep(store, store_dir, received, chosen, held, ui)
    except BaseException:
        if store is not None:  # a store this run created goes again with what it received
            shutil.rmtree(recv_dir, ignore_errors=True)
            store.remove_if_created_empty()
        raise
    finally:
        if store is not None:
            store.close()


def _keep(store: Store, store_dir: Optional[str], received: Bundle, chosen: dict, held: Optional[list[Held]],
          ui: Ui) -> None:
    left = leave_unread_deltas(received)
    added = keep_received(store, received, chosen, held)
    ui.info(f"kept {len(added)} new part(s) in {store_dir}")
    if left:
        ui.info(f"not kept: {', '.join(left)}: delta part(s) this join did not rebuild (another image's, or "
                f"left out by --have); a --keep join of their image without --have keeps them")


def _join_registry(client: RegistryClient, ref: RegistryRef, store_dir: Optional[str], name: Optional[str],
                   trust: Optional[str], held: Optional[list[Held]], output: Optional[str], options: JoinOptions,
                   ui: Ui, memory: int) -> None:
    """isep-join oci://... [STORE]: what STORE lacks fetched (into STORE, resumably, else TMPDIR),
    joined, and kept in STORE as --keep keeps a bundle stream."""
    from ..pull import open_release, pull_directory, pull_parts, remove_pull_directory  # see registry_client
    if output is None:
        stdout_binary()  # a terminal or closed stdout is refused before anything is fetched
    release = open_release(client, ref, trust, ui.warn)
    chosen = select_image(_images(release.bundle), name, str(ref))
    store = Store(store_dir, create=True) if store_dir else None
    held_dir = None
    try:
        local = open_local_store(store_dir) if store_dir else None
        held_dir = pull_directory(store, release.digest) if store else None
        pull_dir = held_dir.path if held_dir else scratch_dir("isep-pull-")
        _thin(options, chosen, held)
        with ui.bar(None, "fetch") as tick:
            client.progress = ui.adding(tick)
            pulled = pull_parts(client, release, chosen, local, pull_dir, ui.warn, options.thin_layers)
        ui.info(f"{ref} ({release.digest[:19]}…): {len(pulled.files)} blob(s) needed, {pulled.moved:,} bytes fetched")
        if store is not None:
            check_keepable(store, pulled.received, chosen)
        parts = isep_part_inputs(pulled.received, chosen, {}, [local] if local else [], have=held)
        parts = _rebuild(parts, store_dir, memory, keep_in=None if store is None else store.path)
        _write(output, parts, chosen, options, chosen.get("trailer_size", 1024), ui)
        if store is not None:
            pulled.settle()
            adopt_rebuilt(pulled.received, parts)  # the store keeps each release's part plain
            _keep(store, store_dir, pulled.received, chosen, held, ui)
            remove_pull_directory(pull_dir)
    finally:
        if held_dir is not None:
            held_dir.close()
        if store is not None:
            store.close()


def _stream_parts(store_dir: Optional[str], name: Optional[str], overrides: dict, trust: Optional[str],
                  held: Optional[list[Held]], recv_dir: str) -> tuple[Bundle, dict, list]:
    """(received bundle, image, part inputs) of a bundle stream on stdin, with the parts it lacks
    from STORE (none when STORE is missing or holds no isep-bundle.json: a first delivery)."""
    local = open_local_store(store_dir) if store_dir else None
    extra = [local] if local is not None else []

    def needs_at_once(needs) -> None:  # the layers delta parts read: refused before their data is read
        check_needs(needs, extra, "the bundle stream")
    received = receive_stream(input_source("-", "bundle stream"), recv_dir, needs_at_once)
    if trust is not None:
        for b in [received, *extra]:
            b.check_signature(trust)
    chosen = select_image(_images(received), name, "the bundle stream")
    try:
        return received, chosen, isep_part_inputs(received, chosen, overrides, extra, have=held)
    except UsageError as exc:
        if store_dir is None or local is not None:
            raise
        raise UsageError(f"{exc}; {store_dir} holds no {BUNDLE_MANIFEST} (a stream without a store "
                         f"must carry every part: isep-pack -o - without --parts)") from None


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


def _rebuild(parts: list, store_dir: Optional[str], memory: int, keep_in: Optional[str]) -> list:
    """Delta parts (isep-pack --delta-from) set to be rebuilt from STORE while they are joined, every
    need and record checked before anything is written; keep_in (--keep: the store) gets each plain
    part written beside the join in a temporary directory, adopted only after the join succeeded."""
    if not any(p.entry is not None and is_delta_part(p.entry) for p in parts):
        return parts
    local = open_local_store(store_dir) if store_dir else None
    keep_dir = scratch_dir(".isep-tmp-rebuild-", keep_in) if keep_in is not None else None
    return prepare_delta_parts(parts, [local] if local is not None else [], memory=memory, keep_dir=keep_dir)


def _write(output, parts, chosen, options, trailer, ui: Ui) -> None:
    if output is None:
        out = stdout_binary()
        with ui.bar(None, "join") as tick:
            options.progress = tick
            checks = join_parts(parts, out, chosen, options, trailer_size=trailer)
        out.flush()
    else:
        checks = _write_file(output_file(output), parts, chosen, options, trailer)
    left_out = f", the files of the bottom {options.thin_layers} left out (--have)" if options.thin_layers else ""
    ui.info(f"{len(checks['parts'])} part(s) checked, {checks['layers']} layer diffIDs verified{left_out}")


def _write_file(target: OutputFile, parts, chosen, options, trailer) -> dict:
    """-o FILE: a device or FIFO written in place; a regular file replaced by a complete one."""
    if target.in_place:
        with open_in_place(target) as out:
            return join_parts(parts, out, chosen, options, trailer_size=trailer)
    fd, temp = scratch_file(".isep-tmp-", os.path.dirname(os.path.abspath(target.path)), target.path)
    sink = FileSink(os.fdopen(fd, "wb", buffering=0), temp, target.path)  # says which file a failure hit
    try:
        os.fchmod(fd, target.mode)
        checks = join_parts(parts, sink, chosen, options, trailer_size=trailer)
        sink.close()  # written out and synced before it takes the name
    finally:
        sink.raw.close()
    try:
        os.replace(temp, target.path)
    except OSError as exc:
        raise os_error(exc, f"cannot write {target.path}") from None
    return checks


def main() -> None:
    launch(app, PROG)


if __name__ == "__main__":
    main()
