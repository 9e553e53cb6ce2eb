"""isep-verify: check a bundle, a bundle stream or an image archive, and say what was checked."""
from __future__ import annotations

import os
import sys
from typing import Optional

import typer

from ..errors import BadInput, ExitStatus, IntegrityError, UsageError
from ..bundle import open_bundle
from ..registryref import RegistryRef, is_registry_ref
from ..manifestcheck import check_needs_list
from ..stream import receive_stream
from ..tarstream import Source
from ..verify import Report, verify_archive, verify_bundle
from .common import (InsecureOption, MirrorOption, Ui, command, launch, new_app, open_input, registry_client, scratch_dir,
                     write_json)

PROG = "isep-verify"
app = new_app(
    "Check a bundle directory (isep's or isula-build's), a bundle stream or an image archive, and "
    "write a JSON report with one entry per check on stdout.",
    "A short summary goes to stderr. For a bundle: the manifest parses and its schema is known; every "
    "part is present with the recorded size and sha256; each part decompresses to a well-formed tar "
    "holding exactly the listed members, each matching its recorded xxh3 (sha256 and recomputed "
    "diffIDs with --deep); every image's layers are present with their diffIDs and its config matches "
    "its digest. --fast uses xxh3 for the parts too. For an image archive (docker save ... | "
    "isep-verify -): it is a complete archive and every layer's diffID matches its config. For a "
    "release in a registry (oci://HOST/REPO:TAG, from isep-push): its manifest and bundle manifests, "
    "signatures with --trust, every blob present with its size; with --deep every blob fetched into a "
    "temporary directory and its sha256 checked.",
    "Exit 0 only when every check passed, 5 otherwise.")
EXAMPLES = (
    ("check a store before shipping it", "isep-verify store/ > report.json"),
    ("check a save before packing it", "docker save apps/web:2 | isep-verify -"),
    ("accept only a bundle signed by a known key",
     "isep-verify --trust ~/.config/isep/allowed_signers /srv/isep"),
    ("check a release in a registry, every blob's sha256 included",
     "isep-verify --deep oci://registry.example:5000/fleet/web:2 > report.json"),
)


@command(app, PROG, EXAMPLES)
def verify(
    ui: Ui,
    target: Optional[str] = typer.Argument(None, metavar="BUNDLE|ARCHIVE|-", help="Bundle directory, archive file, - (stdin: an archive or a bundle stream), or oci://HOST/REPO:TAG (a release artifact in a registry)."),
    fast: bool = typer.Option(False, "--fast", help="xxh3-128 instead of sha256 for part files."),
    deep: bool = typer.Option(False, "--deep", help="Re-hash every member with sha256 and recompute diffIDs."),
    trust: Optional[str] = typer.Option(None, "--trust", metavar="ALLOWED_SIGNERS", help="Require isep-bundle.json to be signed (isep-pack --sign) by a key in this ssh-keygen allowed-signers file; parts are then checked with sha256, never --fast."),
    insecure: bool = InsecureOption,
    mirror: Optional[str] = MirrorOption,
) -> ExitStatus:
    mode = "fast" if fast else "deep" if deep else "standard"
    if trust is not None and fast:
        raise UsageError("--trust needs sha256 part checks: leave out --fast")
    path = target or "-"
    if is_registry_ref(path):
        report = _check_registry(path, trust, mode, insecure, mirror)
    elif path != "-" and os.path.isdir(path):
        report = _check_directory(path, trust, mode)
    else:
        report = _check_input(path, trust, mode)
    doc = report.to_json()
    write_json(doc)
    failed = [c for c in report.checks if c["status"] == "fail"]
    if failed:
        for check in failed[:5]:
            ui.warn(f"FAILED {check['check']}: {check['detail']}")
        print(f"{PROG}: {len(failed)} of {len(report.checks)} checks failed", file=sys.stderr)
        return ExitStatus.INTEGRITY
    ui.info(f"all {len(report.checks)} checks passed ({report.kind}, {mode})")
    return ExitStatus.OK


def _check_directory(path: str, trust: Optional[str], mode: str) -> Report:
    report = Report(path, "bundle", mode)
    try:
        bundle = open_bundle(path)
    except BadInput as exc:  # a damaged manifest is a failed check, like a damaged part
        report.add("manifest", False, str(exc))
        return report
    _check_signature(bundle, trust, report)
    return verify_bundle(bundle, report, mode)


def _check_input(path: str, trust: Optional[str], mode: str) -> Report:
    """A bundle stream or an image archive, told apart by the stream's first member name."""
    fh, name = open_input(path, "bundle or archive")
    first = Source(fh, name=name)
    head = first.read(512)
    source = Source(_Rewound(head, first), name=name)
    if head[:16].startswith(b"isep-stream.json"):
        bundle = receive_stream(source, scratch_dir("isep-verify-"),  # needs malformed: join would refuse
                                lambda needs: check_needs_list(needs, "isep-needs.json", "the bundle stream"))
        report = Report(name, "bundle stream", mode)
        _check_signature(bundle, trust, report)
        return verify_bundle(bundle, report, mode)
    if trust is not None:
        raise UsageError("--trust applies to bundles (an image archive carries no isep signature)")
    return verify_archive(source, Report(name, "archive", mode))


def _check_registry(text: str, trust: Optional[str], mode: str, insecure: bool, mirror: Optional[str]) -> Report:
    if mode == "fast":
        raise UsageError("--fast applies to local parts; an artifact's blobs are checked by size, or by sha256 with --deep")
    ref = RegistryRef.parse(text)
    report = Report(text, "registry artifact", mode)
    from ..pull import verify_release  # see registry_client
    client = registry_client(ref.host, insecure=insecure, mirror=mirror)
    verify_release(client, ref, trust, mode == "deep", report, scratch_dir("isep-verify-"))
    return report


def _check_signature(bundle, trust: Optional[str], report: Report) -> None:
    if trust is None:
        return
    try:
        principal = bundle.check_signature(trust)
    except IntegrityError as exc:
        report.add("signature", False, str(exc))
    else:
        report.add("signature", True, f"isep-bundle.json signed by {principal} (listed in {trust})")


class _Rewound:
    """A raw reader that first gives back bytes already read."""

    def __init__(self, head: bytes, source: Source):
        self.head = memoryview(head)
        self.source = source

    def readinto(self, buf) -> int:
        if len(self.head):
            n = min(len(buf), len(self.head))
            buf[:n] = self.head[:n]
            self.head = self.head[n:]
            return n
        data = self.source.read(len(buf))
        buf[:len(data)] = data
        return len(data)


def main() -> None:
    launch(app, PROG)


if __name__ == "__main__":
    main()
