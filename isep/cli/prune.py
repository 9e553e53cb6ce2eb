"""isep-prune: drop the releases a store no longer needs, and the part files only they read."""
from __future__ import annotations

import sys
from typing import Optional

import typer

from ..bundle import LOCK_WAIT
from ..errors import ExitStatus
from ..prune import PrunePlan, prune
from .common import Ui, command, launch, new_app, write_json

PROG = "isep-prune"
app = new_app(
    "Drop the images of a store that are not kept, and every part file no kept image needs.",
    "Kept are the images named by --keep (as isep-join names them: a tag or a config digest; the "
    "newest entry of that name) and the last N images added to the store of each repository "
    "(--keep-last). A part stays when a kept image's join reads it: its own parts, and for a delta "
    "part, the store parts carrying the layers it is rebuilt from. A part no image of the store names "
    "(a base packed alone) stays too.",
    "Under the store's lock (see --wait) the new isep-bundle.json is written first, atomically, and "
    "isula-build's manifest loses the entries of dropped images; then the other part files are removed. "
    "A crash in between leaves unlisted part files, which isep-verify notes as strays and the next "
    "isep-prune removes. A signed store's isep-bundle.json.sig no longer matches: it is removed (said "
    "on stderr); the next isep-pack --sign into the store signs it again.",
    "The pull directories of interrupted isep-join oci:// runs (.isep-tmp-pull-*, kept for a rerun to "
    "resume) are removed too, except one a running pull holds (each pull locks its directory for as "
    "long as it runs); a rerun of a removed pull fetches again. stdout lists each as NAME/.",
    "stdout lists the files removed (with --dry-run: that would be removed), one per line, or a JSON "
    "document with --json; the summary goes to stderr.")
EXAMPLES = (
    ("keep the last two releases of each repository", "isep-prune /var/lib/isep/store --keep-last 2"),
    ("keep exactly these images", "isep-prune store/ --keep apps/web:3 --keep apps/worker:3"),
    ("see what would go, without changing anything", "isep-prune store/ --keep-last 1 --dry-run"),
)


@command(app, PROG, EXAMPLES)
def prune_command(
    ui: Ui,
    store: str = typer.Argument(..., metavar="STORE", help="The isep store (a directory with isep-bundle.json)."),
    keep: Optional[list[str]] = typer.Option(None, "--keep", "-k", metavar="IMAGE", help="Keep this image (a tag or config digest in STORE; repeatable). A name that is in no image of STORE is refused (exit 2)."),
    keep_last: Optional[int] = typer.Option(None, "--keep-last", metavar="N", min=1, help="Keep the last N images added to STORE of each repository."),
    dry_run: bool = typer.Option(False, "--dry-run", "-n", help="Only list what would be removed; change nothing (the lock is not taken)."),
    as_json: bool = typer.Option(False, "--json", help="stdout: a JSON document (removed, freed_bytes, images_kept, images_dropped) instead of one file per line."),
    wait: float = typer.Option(LOCK_WAIT, "--wait", metavar="SECONDS", min=0, help="How long to wait for another isep run's lock on STORE before giving up (exit 3); 0 gives up at once."),
) -> ExitStatus:
    plan = prune(store, keep or [], keep_last, dry_run=dry_run, wait=wait, warn=ui.warn)
    if as_json:
        write_json({**plan.to_json(), "dry_run": dry_run})
    else:
        sys.stdout.write("".join(f"{name}\n" for name in plan.removed))
        sys.stdout.flush()
    ui.info(_summary(plan, dry_run))
    return ExitStatus.OK


def _summary(plan: PrunePlan, dry_run: bool) -> str:
    verb = "would remove" if dry_run else "removed"
    strays = f" (of them {len(plan.strays)} unlisted)" if plan.strays else ""
    n = len(plan.pull_dirs)
    pulls = f" and {n} pull director{'y' if n == 1 else 'ies'}" if n else ""
    return (f"{verb} {len(plan.removed_parts + plan.strays)} part file(s){strays}{pulls}, {plan.freed_bytes:,} bytes; "
            f"{len(plan.kept_images)} image(s) kept, {len(plan.dropped_images)} dropped")


def main() -> None:
    launch(app, PROG)


if __name__ == "__main__":
    main()
