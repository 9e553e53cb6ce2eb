"""Write seed corpora for the harnesses: small sample archives of every producer format (tar
seeds), and bundle manifests and metadata JSON (json seeds).  Usage: make_seeds.py DIR"""
from __future__ import annotations

import io
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from isep import samples  # noqa: E402
from isep.tarstream import Source, TarReader  # noqa: E402


def main(out: Path) -> None:
    (out / "tar").mkdir(parents=True, exist_ok=True)
    (out / "json").mkdir(parents=True, exist_ok=True)
    images = samples.sample_images(seed=0, layer_kib=1)
    for fmt in samples.FORMATS:
        buf = io.BytesIO()
        samples.write_archive(buf, fmt, [images["base"]])
        data = buf.getvalue()
        (out / "tar" / f"{fmt}.tar").write_bytes(data)
        for member in TarReader(Source(io.BytesIO(data), prefetch=False)):
            if member.is_file and member.size < 8192:
                body = member.read_all(8192)
                if body[:1] in (b"{", b"["):
                    name = member.name.replace("/", "_")[-40:]
                    (out / "json" / f"{fmt}-{name}").write_bytes(body)
    with tempfile.TemporaryDirectory() as tmp:
        from isep.bundle import Store
        from isep.pack import PackOptions, pack_one_shot
        from isep.refs import Ref
        from isep.targets import DirTarget
        buf = io.BytesIO()
        samples.write_archive(buf, "docker-oci", [images["app1"]])
        base = Ref("base", samples.diff_ids(images["base"]), ["isep-sample/base:1"])
        lib = Ref("lib", samples.diff_ids(images["lib"]), ["isep-sample/lib:1"])
        pack_one_shot(Source(io.BytesIO(buf.getvalue()), name="seed"), base, lib,
                      DirTarget(Store(os.path.join(tmp, "store"))), PackOptions(compression="none"))
        (out / "json" / "isep-bundle.json").write_bytes(Path(tmp, "store", "isep-bundle.json").read_bytes())


if __name__ == "__main__":
    main(Path(sys.argv[1]))
