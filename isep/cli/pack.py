"""isep-pack: split an image archive into base, lib and app parts in one pass."""
from __future__ import annotations

import enum
import os
import stat
import sys
from typing import Optional

import typer

from .. import __version__
from ..archive import build_index, scan_metadata
from ..bundle import LOCK_WAIT, Store
from ..errors import EnvironmentFailure, UsageError
from ..pack import ROLES, PackOptions, pack_one_shot, pack_with_plan
from ..limits import PLAN_CAP, parse_delta_memory
from ..partition import make_plan
from ..plancheck import check_plan
from ..registryref import RegistryRef, is_registry_ref
from ..refs import read_json_file
from ..targets import DirTarget
from ..tarstream import Source
from .common import (
    ArchiveArgument,
    Compression,
    CompressOption,
    RenameOption,
    Ui,
    command,
    input_size,
    launch,
    new_app,
    open_input,
    read_renames,
    registry_client,
    require_stream,
    resolve_refs,
    scratch_dir,
    stdout_binary,
)

PROG = "isep-pack"
app = new_app(
    "Split an image archive into a base part, a lib part and one app part per image, written into a "
    "store directory or as one bundle stream on stdout.",
    "The archive is read from ARCHIVE or stdin once. The parts are compressed tars holding its "
    "members byte for byte; the store DIR also gets the bundle manifest isep-bundle.json and "
    "isula-build's `manifest`; with -o - everything goes out as one bundle stream on stdout.",
    "With --plan (from isep-partition) nothing is decided again and no temporary disk is used. With "
    "--base/--lib, an ARCHIVE file is read twice (its headers, then everything) and uses no temporary "
    "disk; a pipe is read once, and a member whose layer only its content reveals (a legacy "
    "<v1id>/layer.tar, a compressed blob) is held in a spool of at most one layer in DIR (TMPDIR with "
    "-o -); with -o - the app part is held, compressed, in TMPDIR until the save's metadata arrives.",
    "Parts already in DIR with the same layers are reused, not written again. Output is atomic: "
    "temporary dot-files renamed when complete, the bundle manifest last; on any failure they are "
    "removed and nothing that was there before changes.")
EXAMPLES = (
    ("pack a save into a store; only parts it lacks are written",
     "docker save apps/web:2 | isep-pack --base base.json --lib lib.json -o store/"),
    ("execute a plan made by isep-partition", "isep-pack web.tar --plan plan.json -o store/"),
    ("pack and push a release to a registry (isep-join oci://... on the devices)",
     "docker save apps/web:2 | isep-pack --base base.json -o oci://registry.example:5000/fleet/web:2"),
    ("a release update: only the app part, as a stream to a device that holds base and lib",
     "isep-pack web.tar --base store/ --lib store/ --parts app -o - | ssh device 'isep-join /srv/isep - | docker load'"),
)


class Layout(str, enum.Enum):
    isep = "isep"
    isula = "isula"


def _parse_parts(text: str) -> tuple[str, ...]:
    roles = tuple(r.strip() for r in text.split(",") if r.strip())
    bad = [r for r in roles if r not in ROLES]
    if bad or not roles:
        raise UsageError(f"--parts takes a comma-separated subset of base,lib,app (got {text!r})")
    return roles


def _seekable_file(fh) -> bool:
    try:
        return stat.S_ISREG(os.fstat(fh.fileno()).st_mode)
    except (OSError, ValueError, AttributeError):
        return False


@command(app, PROG, EXAMPLES, progress=True)
def pack(
    ui: Ui,
    archive: Optional[str] = ArchiveArgument,
    output: str = typer.Option(..., "--output", "-o", metavar="DIR|-", help="Store directory (created if missing; its parent must exist), - for a bundle stream on stdout, or oci://HOST/REPO:TAG: the bundle packed into a temporary directory and pushed as isep-push pushes it (its digest on stdout; for delta bundles and --mount-from use isep-push)."),
    plan_file: Optional[str] = typer.Option(None, "--plan", "-p", metavar="PLAN", help="A plan from isep-partition."),
    base: Optional[str] = typer.Option(None, "--base", "-b", metavar="REF", help="The base image (as for isep-partition)."),
    lib: Optional[str] = typer.Option(None, "--lib", "-l", metavar="REF", help="The lib image, built on the base."),
    parts: str = typer.Option("base,lib,app", "--parts", metavar="LIST", help="Which parts to write: a subset of base,lib,app (e.g. app for an update)."),
    compress: Compression = CompressOption,
    level: Optional[int] = typer.Option(None, "--level", metavar="LEVEL", help="Compression level (zstd 1-19, default 3; gzip 1-9, default 2: 1-3 ISA-L, 4-9 zlib)."),
    rename: Optional[str] = RenameOption,
    no_isula_manifest: bool = typer.Option(False, "--no-isula-manifest", help="Do not write isula-build's `manifest` file."),
    sign: Optional[str] = typer.Option(None, "--sign", metavar="KEY", help="Sign isep-bundle.json with this SSH key (ssh-keygen -Y sign, namespace isep) into isep-bundle.json.sig; receivers check it with --trust."),
    delta_from: Optional[str] = typer.Option(None, "--delta-from", metavar="STORE", help="Ship only what the receiver's STORE (a copy of the device's store) lacks: a layer a part in STORE carries is referenced, not shipped; another layer is shipped as a zstd delta against the most similar layer of STORE when that is smaller, else plain. The bundle has the schema isep-bundle/2, which older isep versions refuse. The parts wait uncompressed in DIR (TMPDIR with -o -) until they ship."),
    delta_memory: str = typer.Option("1G", "--delta-memory", metavar="SIZE", help="Memory one delta may use (reference slice plus window); larger layers are cut into segments, and the receiver needs as much (isep-join --delta-memory)."),
    wait: float = typer.Option(LOCK_WAIT, "--wait", metavar="SECONDS", min=0, help="How long to wait for another pack's lock on the store DIR before giving up (exit 3); 0 gives up at once."),
    layout: Layout = typer.Option(Layout.isep, "--format", help="isep: parts hold the original members verbatim (byte-exact joins). isula: isula-build's layout (<legacyID>/layer.tar, config, manifest.json; new headers), which `isula-build ctr-img load -d DIR` loads; use with --compress gzip. From a pipe, the app section waits, compressed, in DIR."),
) -> None:
    if (plan_file is None) == (base is None):
        raise UsageError("give either --plan PLAN or --base REF (with an optional --lib REF)")
    if plan_file is not None and (lib is not None or rename is not None):
        raise UsageError("--lib and --rename belong to the plan; give them to isep-partition")
    roles = _parse_parts(parts)
    fh, name = open_input(archive, "archive")
    options = PackOptions(compression=compress.value, level=level, parts=roles,
                          isula_manifest=not no_isula_manifest,
                          renames=read_renames(rename, compress.value), layout=layout.value)
    plan = None
    if plan_file is not None:
        plan = check_plan(read_json_file(plan_file, "--plan", PLAN_CAP), f"--plan {plan_file}",
                          isula=layout == Layout.isula)
        if plan.get("compression", compress.value) != compress.value:
            raise UsageError(f"the plan names parts for --compress {plan['compression']}")
    if sign is not None and not os.path.isfile(sign):
        raise EnvironmentFailure(f"cannot read signing key {sign}: no such file")
    if delta_from is not None and layout == Layout.isula:
        raise UsageError("--delta-from makes isep parts: isula-build cannot load them (leave out --format isula)")
    memory = parse_delta_memory(delta_memory)
    reference = None
    if delta_from is not None:
        from ..deltapack import DeltaTarget, open_reference_store  # see _run
        reference = open_reference_store(delta_from)
    push_to = None
    if is_registry_ref(output):
        push_to = RegistryRef.parse(output)
        if reference is not None or len(roles) < len(ROLES) or layout == Layout.isula:
            raise UsageError("-o oci:// pushes a whole release: no --delta-from, --parts or --format isula "
                             "(pack into a directory, then isep-push it with --delta)")
        require_stream("stdout", "the pushed manifest's digest")
        output = scratch_dir("isep-pack-push-")
    target = _open_target(output, sign, wait, ui)
    if reference is not None:
        target = DeltaTarget(target, reference, compression=compress.value, level=level, memory=memory)
    try:
        with ui.bar(input_size(archive), "pack") as tick:
            options.progress = tick
            result = _run(fh, name, plan, base, lib, target, options)
    except BaseException:
        target.abort()
        raise
    _summary(ui, result)
    if reference is not None:
        _delta_summary(ui, target.shipped)
    if push_to is not None:
        from ..push import open_release_bundle, push_release  # see registry_client
        digest = push_release(registry_client(push_to.host), push_to, open_release_bundle(output, "the packed bundle"),
                              [], [], lambda upload, outcome: None)
        sys.stdout.write(digest + "\n")
        ui.info(f"pushed {push_to} as {digest}")


def _open_target(output: str, sign: Optional[str], wait: float, ui: Ui):
    if output == "-":
        from ..stream import StreamTarget  # see _run
        return StreamTarget(stdout_binary(), {"isep": __version__}, sign_key=sign)
    return DirTarget(Store(output), sign_key=sign, lock_wait=wait, warn=ui.warn)


def _run(fh, name, plan, base, lib, target, options):
    # The isula, stream and delta modules are imported only by the runs that use them: start-up is
    # an eighth of a 256 MiB pack (bench/RESULTS.md, 2026-11-30)
    execute, one_shot = pack_with_plan, pack_one_shot
    if options.layout == "isula":
        from ..isula import pack_isula as execute, pack_isula_stream as one_shot
    if plan is not None:
        return execute(Source(fh, name=name), plan, target, options)
    if _seekable_file(fh):  # a file: walk its headers first, then pack with the plan (no spool at all)
        plan = _plan_of_file(fh, name, base, lib, options)
        fh.seek(0)
        return execute(Source(fh, name=name), plan, target, options)
    base_ref, lib_ref = resolve_refs(base, lib, None)
    return one_shot(Source(fh, name=name), base_ref, lib_ref, target, options)


def _plan_of_file(fh, name: str, base: str, lib: Optional[str], options: PackOptions) -> dict:
    """The plan of an archive file from its headers. The index goes when this returns: pack consumes
    the plan's member records, which must have no other holder to be freed (docs/formats.md)."""
    index = build_index(scan_metadata(Source(fh, name=name, prefetch=False)))
    base_ref, lib_ref = resolve_refs(base, lib, index["images"])
    return make_plan(index, base_ref, lib_ref, compression=options.compression, renames=options.renames)


def _summary(ui: Ui, result) -> None:
    final = {p["file"]: p for p in result.manifest["parts"]}  # delta parts (--delta-from) as shipped
    written = [final.get(p["file"], p) for p in result.written]
    raw = sum(p["raw_size"] for p in result.written)
    size = sum(p["size"] for p in written)
    secs = max(ui.elapsed(), 1e-6)
    ratio = f", {raw / size:.2f}x" if size else ""
    reused = f", reused {', '.join(result.reused)}" if result.reused else ""
    ui.info(f"{len(written)} part(s), {raw:,} -> {size:,} bytes{ratio}{reused}; "
            f"{result.source_bytes / secs / 1e6:.0f} MB/s in {secs:.1f} s")


def _delta_summary(ui: Ui, shipped: list) -> None:
    counts = {kind: [s for s in shipped if s["ship"] == kind] for kind in ("reference", "delta", "plain")}
    raw = sum(s["size"] for s in shipped)
    ui.info(f"--delta-from: {len(shipped)} layer(s) of {raw:,} bytes: {len(counts['reference'])} referenced, "
            f"{len(counts['delta'])} as deltas of {sum(s['bytes'] for s in counts['delta']):,} bytes, "
            f"{len(counts['plain'])} plain")


def main() -> None:
    launch(app, PROG)


if __name__ == "__main__":
    main()
