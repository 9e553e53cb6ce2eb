"""isep-push: push a bundle to an OCI registry as one release artifact."""
from __future__ import annotations

import sys
from typing import Optional

import typer

from ..artifact import Upload
from ..push import open_release_bundle, push_release, require_tag
from ..registry import RegistryClient, RegistryRef
from .common import InsecureOption, Ui, command, launch, new_app, require_stream

PROG = "isep-push"
app = new_app(
    "Push a bundle to an OCI registry as one release artifact, for devices to pull with "
    "isep-join oci://.",
    "BUNDLE is a bundle directory (isep-pack -o DIR). REF is oci://HOST[:PORT]/REPO:TAG. The release "
    "is one OCI image manifest (artifactType application/vnd.isep.bundle.v1): the bundle's "
    "isep-bundle.json byte for byte as its config blob (a signature still verifies), each part as a "
    "layer titled with its file name, the signature, and for each --delta bundle (isep-pack "
    "--delta-from STORE -o DIR, against an earlier release) its manifest, signature and delta parts, so "
    "that they live and die with the release's tag. A device pulls only what its store lacks, and a "
    "delta part instead of a part when its store holds what the delta reads (docs/formats.md, "
    "\"Registry artifacts\").",
    "A blob the repository holds is skipped; else it is mounted from the first --mount-from repository "
    "of the same registry that holds it (a base part shared by several app repositories crosses once); "
    "else uploaded in chunks (flat memory; a dropped connection resumes). The manifest is pushed "
    "last: a failed push leaves no tag pointing at a half release. The manifest's digest is written "
    "to stdout; each blob's outcome (present, mounted, uploaded) to stderr unless -q. Credentials come "
    "from the environment or the docker config file (see the README).")
EXAMPLES = (
    ("push release 1", "isep-push build/r1 oci://registry.example:5000/fleet/web:1"),
    ("release 2 with the delta from release 1, the base mounted from another app's repository",
     "isep-push build/r2 oci://registry.example:5000/fleet/web:2 --delta build/d1-2 --mount-from fleet/api"),
)


@command(app, PROG, EXAMPLES, progress=True)
def push(
    ui: Ui,
    bundle: str = typer.Argument(..., metavar="BUNDLE", help="Bundle directory to push."),
    ref: str = typer.Argument(..., metavar="oci://HOST/REPO:TAG", help="Where to push the release."),
    delta: Optional[list[str]] = typer.Option(None, "--delta", metavar="DELTA_BUNDLE", help="A delta bundle (isep-pack --delta-from STORE -o DIR) to carry with the release (repeatable)."),
    mount_from: Optional[list[str]] = typer.Option(None, "--mount-from", metavar="REPO", help="A repository of the same registry to mount blobs from instead of uploading them (repeatable)."),
    insecure: bool = InsecureOption,
) -> None:
    target = RegistryRef.parse(ref)
    require_tag(target)  # a usage error, said before BUNDLE is opened
    release = open_release_bundle(bundle, "BUNDLE")
    deltas = [open_release_bundle(path, "--delta") for path in delta or []]
    require_stream("stdout", "the pushed manifest's digest")
    client = RegistryClient(target.host, insecure=insecure)
    moved = {"present": 0, "mounted": 0, "uploaded": 0}

    def report(upload: Upload, outcome: str) -> None:
        d = upload.descriptor
        moved[outcome] = moved.get(outcome, 0) + d.size
        ui.info(f"{outcome}: {d.title or d.media_type} ({d.size:,} bytes, {d.digest[7:19]})")
    with ui.bar(None, "push") as tick:
        client.progress = ui.adding(tick)
        digest = push_release(client, target, release, deltas, mount_from or [], report)
    sys.stdout.write(digest + "\n")
    ui.info(f"pushed {target} as {digest}: " + ", ".join(f"{n:,} bytes {k}" for k, n in moved.items()))


def main() -> None:
    launch(app, PROG)


if __name__ == "__main__":
    main()
