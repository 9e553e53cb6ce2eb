"""By hand, not in CI: python bench/isula-real-images.py OUTDIR. The bench's 1 GiB image family (seed 0, 4 layers, half random) as containers/image docker-archives
for isula-build: base (1 layer), lib (2), app (4); and the refs isep-pack needs."""
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from isep import samples
out = sys.argv[1]
fam = samples.big_image_family(1 << 30, random_fraction=0.5, layers=4, seed=0)
for role in ("base", "lib", "app"):
    img = fam[role]
    with open(f"{out}/{role}.tar", "wb", buffering=1 << 20) as f:
        samples.write_archive(f, "podman", [img])
    open(f"{out}/{role}.json", "w").write(samples.inspect_json(img, "podman"))
    print(role, img.name, len(img.layers))
