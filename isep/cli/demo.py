"""isep-demo: the whole job, end to end, on built-in sample images (no Docker needed)."""
from __future__ import annotations

import enum
import filecmp
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import typer

from ..errors import ExitStatus
from ..samples import write_sample_set
from .common import command, launch, new_app

PROG = "isep-demo"
app = new_app(
    "Run the whole isep pipeline, through real pipes, on built-in sample images (no Docker needed).",
    "Sample base, lib and app archives faithful to a real producer's `docker save` output "
    "(isep.samples) go through the commands as a user would run them: index, partition, pack, "
    "verify, join (checked byte for byte against the original save), a release update that ships "
    "only the new app part, and a device that receives that part as a bundle stream and joins it "
    "with the base and lib it already holds. Every command is printed before it runs.",
    "Exit 0 when every step gave the expected result.")
EXAMPLES = (
    ("the demo in a temporary directory, removed afterwards", "isep-demo"),
    ("keep the files, with archives as podman saves them", "isep-demo --dir /tmp/isep-demo --format podman"),
)


class Producer(str, enum.Enum):
    """The producers whose archives isep.samples imitates."""
    docker_legacy = "docker-legacy"
    docker_oci = "docker-oci"
    docker_cstore = "docker-cstore"
    podman = "podman"
    oci_archive = "oci-archive"


class _Step:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.failures: list[str] = []

    def run(self, pipeline: str, *, stdout_file: Optional[str] = None, expect: int = 0) -> subprocess.CompletedProcess:
        """Run a shell pipeline of isep commands (resolved to this Python) in the work dir."""
        shown = pipeline + (f" > {stdout_file}" if stdout_file else "")
        print(f"\n$ {shown}", flush=True)
        env = dict(os.environ)
        bindir = self.workdir / ".bin"
        env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
        out = open(self.workdir / stdout_file, "wb") if stdout_file else None
        try:
            proc = subprocess.run(["bash", "-o", "pipefail", "-c", pipeline], cwd=self.workdir, env=env,
                                  stdout=out or subprocess.PIPE, stderr=subprocess.PIPE)
        finally:
            if out is not None:
                out.close()
        if proc.stdout:
            sys.stdout.write("".join(f"  {line}\n" for line in proc.stdout.decode(errors="replace").splitlines()))
        if proc.stderr:
            sys.stdout.write("".join(f"  | {line}\n" for line in proc.stderr.decode(errors="replace").splitlines()))
        if proc.returncode != expect:
            self.fail(f"`{shown}` exited {proc.returncode}, expected {expect}")
        return proc

    def check(self, ok: bool, what: str) -> None:
        print(f"  {'ok' if ok else 'FAILED'}: {what}", flush=True)
        if not ok:
            self.failures.append(what)

    def fail(self, what: str) -> None:
        self.check(False, what)


def _install_shims(bindir: Path) -> None:
    """isep-* commands in PATH that run this very isep (installed or from a checkout)."""
    bindir.mkdir(parents=True, exist_ok=True)
    root = Path(__file__).resolve().parents[2]
    for cmd in ("index", "partition", "pack", "verify", "join"):
        shim = bindir / f"isep-{cmd}"
        shim.write_text(f"#!/bin/sh\nPYTHONPATH={shlex.quote(str(root))}${{PYTHONPATH:+:$PYTHONPATH}} "
                        f"exec {shlex.quote(sys.executable)} -m isep.cli.{cmd} \"$@\"\n")
        shim.chmod(0o755)


def _diff_ids(workdir: Path, index_file: str) -> list[list[str]]:
    doc = json.loads((workdir / index_file).read_text())
    return [im["diff_ids"] for im in doc["images"]]


@command(app, PROG, EXAMPLES, quiet=False)
def demo(
    directory: Optional[Path] = typer.Option(None, "--dir", "-d", metavar="DIR", help="Work here (kept) instead of a temporary directory."),
    producer: Producer = typer.Option(Producer.docker_oci, "--format", "-f", help="Producer to imitate."),
) -> int:
    workdir = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="isep-demo-"))
    try:
        return _demo(workdir, producer.value)
    finally:
        if directory is None:
            shutil.rmtree(workdir, ignore_errors=True)


def _demo(workdir: Path, fmt: str) -> int:
    workdir.mkdir(parents=True, exist_ok=True)
    _install_shims(workdir / ".bin")
    print(f"isep demo in {workdir}: sample images saved as {fmt} archives")
    paths = write_sample_set(workdir / "saves", fmt)
    for key in ("base", "lib", "app1", "app1-2"):
        print(f"  saves/{paths[key].name:<12} {paths[key].stat().st_size:>10,} bytes")
    step = _Step(workdir)

    print("\n== 1. Describe the base and lib images once (isep-index, or docker inspect)")
    step.run("isep-index saves/base.tar", stdout_file="base.json")
    step.run("isep-index saves/lib.tar", stdout_file="lib.json")

    print("\n== 2. Dry run: what goes where")
    step.run("cat saves/app1.tar | isep-index | isep-partition --base base.json --lib lib.json --summary",
             stdout_file="plan.json")

    print("\n== 3. Pack release 1 from a pipe, verify, join and compare with the original save")
    step.run("cat saves/app1.tar | isep-pack --base base.json --lib lib.json -o store")
    step.run("ls -l store")
    step.run("isep-verify store", stdout_file="verify.json")
    report = json.loads((workdir / "verify.json").read_text() or "{}")
    step.check(report.get("ok") is True, f"isep-verify ran {report.get('checked')} checks, all passed")
    step.run("isep-join store isep-sample/app1:1", stdout_file="joined.tar")
    step.check(filecmp.cmp(workdir / "joined.tar", paths["app1"], shallow=False),
               "joined archive is byte-identical to the original save (cmp)")

    print("\n== 4. Release 2: only the new app part is written into the store")
    before = set(os.listdir(workdir / "store"))
    step.run("cat saves/app1-2.tar | isep-pack --base store --lib store -o store")
    added = sorted(set(os.listdir(workdir / "store")) - before)
    step.check(added == ["app1_2_app_image.tar.zst"], f"new files in the store: {added}")

    print("\n== 5. A device that holds base and lib receives release 2's app part as a stream")
    step.run("mkdir -p device && cat saves/app1.tar | isep-pack -q --base base.json --lib lib.json "
             "-o device --parts base,lib")
    proc = step.run("isep-pack -q saves/app1-2.tar --base base.json --lib lib.json -o - --parts app "
                    "| tee update.stream | isep-join device - ", stdout_file="device-joined.tar")
    sent = (workdir / "update.stream").stat().st_size
    full = paths["app1-2"].stat().st_size
    print(f"  sent {sent:,} bytes instead of the full {full:,}-byte save ({100 * sent / full:.1f}%)")
    step.run("isep-index device-joined.tar", stdout_file="device-joined.json")
    step.run("isep-index saves/app1-2.tar", stdout_file="app1-2.json")
    if proc.returncode == 0:
        step.check(_diff_ids(workdir, "device-joined.json") == _diff_ids(workdir, "app1-2.json"),
                   "the device's image has release 2's layers (diffIDs equal)")

    print("\n== 6. A damaged part is caught")
    damaged = workdir / "damaged"
    shutil.copytree(workdir / "store", damaged)
    part = damaged / "base_1_base_image.tar.zst"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0x01
    part.write_bytes(bytes(data))
    proc = step.run("isep-join damaged isep-sample/app1:1 > /dev/null", expect=ExitStatus.INTEGRITY)
    step.check(proc.returncode == ExitStatus.INTEGRITY, f"isep-join refused the damaged bundle (exit {proc.returncode})")

    print()
    if step.failures:
        print(f"demo FAILED: {len(step.failures)} step(s): " + "; ".join(step.failures))
        return ExitStatus.INTEGRITY
    print("demo OK: every step gave the expected result")
    return ExitStatus.OK


def main() -> None:
    launch(app, PROG)


if __name__ == "__main__":
    main()
