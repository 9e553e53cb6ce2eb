"""A three-release chain (full, delta, delta) for two apps on one base, as bundle directories
ready to push: for each app, rN (the full bundle of release N) and dMN (release N packed with
--delta-from release M's bundle), and the saves to compare joins with."""
from __future__ import annotations

from pathlib import Path

from isep.samples import Image, inspect_json, write_archive
from tests.harness import isep
from tests.release_samples import base_layer, bases, code_layer, deps_layer

APPS = ("app1", "app2")
RELEASES = (1, 2, 3)


def app_image(app: str, release: int, repo: str) -> Image:
    """Release 2 changes code; release 3 bumps a dependency. app2's code differs from app1's."""
    offset = 0 if app == "app1" else 40
    deps = 1 if release < 3 else 2
    return Image(f"{repo}/{app}:{release}", [base_layer(1), deps_layer(deps), code_layer(release + offset)])


def build_chain(root: Path, repo: str = "isep-fleet") -> dict[str, Path]:
    """Keys: 'base' (the base's inspect JSON), '<app>/save<N>', '<app>/r<N>', '<app>/d<M><N>'."""
    root.mkdir(parents=True, exist_ok=True)
    base = root / "base.json"
    base.write_text(inspect_json(bases(f"{repo}/base")["base1"], "docker-oci"))
    made: dict[str, Path] = {"base": base}
    for app in APPS:
        for n in RELEASES:
            save = root / app / f"save{n}.tar"
            save.parent.mkdir(exist_ok=True)
            with open(save, "wb") as fh:
                write_archive(fh, "docker-oci", [app_image(app, n, repo)])
            made[f"{app}/save{n}"] = save
            made[f"{app}/r{n}"] = root / app / f"r{n}"
            isep("pack", save, "--base", base, "-o", made[f"{app}/r{n}"], check=0)
            if n > 1:
                made[f"{app}/d{n - 1}{n}"] = root / app / f"d{n - 1}{n}"
                isep("pack", save, "--base", base, "-o", made[f"{app}/d{n - 1}{n}"],
                     "--delta-from", made[f"{app}/r{n - 1}"], check=0)
    return made
