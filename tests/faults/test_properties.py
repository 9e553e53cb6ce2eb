"""Properties (hypothesis, in-process, bounded example counts):

* round trip: join(pack(x)) == x byte for byte, for random layer stacks in every producer format,
  packed with a plan (a file) or in one pass (a pipe), with any compression;
* any single-byte change of a part is caught by verify (every mode) and by join;
* any single-byte change of the bundle manifest is caught by verify --deep, or it is harmless:
  join then still writes the original archive. Never does a damaged manifest make join write
  something else and succeed.
"""
from __future__ import annotations

import io
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from isep import samples as S
from isep.archive import build_index, scan
from isep.bundle import Store
from isep.errors import IsepError
from isep.bundle import isep_part_inputs, open_bundle, select_image
from isep.join import JoinOptions, join_parts
from isep.pack import PackOptions, pack_one_shot, pack_with_plan
from isep.partition import make_plan
from isep.refs import Ref
from isep.targets import DirTarget
from isep.tarstream import Source
from isep.verify import Report, verify_bundle
from tests.harness import part_files

SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

names = st.text(alphabet="abcdefgh._-", min_size=1, max_size=12).filter(lambda n: n not in (".", ".."))
paths = st.lists(names, min_size=1, max_size=3).map("/".join)


@st.composite
def layers(draw):
    files = draw(st.lists(st.tuples(paths, st.binary(max_size=3000)), max_size=4,
                          unique_by=lambda f: f[0]))
    links = draw(st.lists(st.tuples(paths, paths), max_size=1, unique_by=lambda f: f[0]))
    links = [(p, t) for p, t in links if p not in {f for f, _ in files} and
             not any(f.startswith(p + "/") for f, _ in files)]
    return S.Layer(files=files, symlinks=links, mtime=draw(st.integers(0, 2 ** 31)))


@st.composite
def stacks(draw):
    """(base, lib or None, app) images sharing their bottom layers."""
    pool = draw(st.lists(layers(), min_size=2, max_size=6))
    empty = S.Layer(mtime=0)
    nb = draw(st.integers(1, max(1, len(pool) - 1)))
    nl = draw(st.integers(0, len(pool) - nb - 1))
    app_layers = pool + draw(st.lists(st.just(empty), max_size=2))  # repeated empty layers too
    created = "2024-01-01T00:00:00Z"
    base = S.Image("prop/base:1", pool[:nb], created)
    lib = S.Image("prop/lib:1", pool[:nb + nl], created) if nl else None
    app = S.Image(draw(st.sampled_from(["prop/app:1", "reg.example:5000/team/app:v2", "app"])),
                  app_layers, created, {"Env": ["A=1"]})
    return base, lib, app


def _ref(image: S.Image) -> Ref:
    return Ref(display=image.name, diff_ids=S.diff_ids(image), tags=[image.name])


def _join(store: Path) -> bytes:
    bundle = open_bundle(str(store))
    image = select_image(bundle.doc["images"], None, str(store))
    out = io.BytesIO()
    join_parts(isep_part_inputs(bundle, image, {}), out, image, JoinOptions(),
               trailer_size=image.get("trailer_size", 1024))
    return out.getvalue()


def _pack(archive: bytes, base: S.Image, lib: S.Image | None, store: Path, *, one_pass: bool,
          compression: str) -> None:
    options = PackOptions(compression=compression)
    target = DirTarget(Store(str(store)))
    base_ref, lib_ref = _ref(base), (_ref(lib) if lib else None)
    if one_pass:
        pack_one_shot(Source(io.BytesIO(archive), name="pipe"), base_ref, lib_ref, target, options)
    else:
        index = build_index(scan(Source(io.BytesIO(archive), name="file")))
        plan = make_plan(index, base_ref, lib_ref, compression=compression)
        pack_with_plan(Source(io.BytesIO(archive), name="file"), plan, target, options)


@settings(max_examples=120, **SETTINGS)
@given(stack=stacks(), fmt=st.sampled_from(S.FORMATS), one_pass=st.booleans(),
       compression=st.sampled_from(["zstd", "gzip", "none"]))
def test_round_trip_is_byte_exact(stack, fmt, one_pass, compression):
    base, lib, app = stack
    out = io.BytesIO()
    S.write_archive(out, fmt, [app])
    archive = out.getvalue()
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        _pack(archive, base, lib, store, one_pass=one_pass, compression=compression)
        report = verify_bundle(open_bundle(str(store)), Report(str(store), "bundle", "deep"), "deep")
        assert report.ok, report.checks
        assert _join(store) == archive


class _Quiet(bytes):
    def __repr__(self) -> str:  # hypothesis prints the arguments of a falsifying example
        return f"<{len(self)} bytes>"


@pytest.fixture(scope="module")
def pristine(stores):
    return stores["docker-oci"]


@pytest.fixture(scope="module")
def original(samples):
    return _Quiet(samples["docker-oci"]["app1"].read_bytes())


def _corrupt(src: Path, tmp: str, name: str, position: float, xor: int) -> Path:
    store = Path(tmp) / "store"
    shutil.copytree(src, store)
    path = store / name
    data = bytearray(path.read_bytes())
    at = min(int(position * len(data)), len(data) - 1)
    data[at] ^= xor
    path.write_bytes(bytes(data))
    return store


@settings(max_examples=300, **SETTINGS)
@given(role=st.sampled_from(["base", "lib", "app"]), position=st.floats(0, 1), xor=st.integers(1, 255),
       mode=st.sampled_from(["fast", "standard", "deep"]))
def test_any_byte_of_a_part_changed_is_caught(role, position, xor, mode, pristine):
    name = part_files(pristine)[role]
    with tempfile.TemporaryDirectory() as tmp:
        store = _corrupt(pristine, tmp, name, position, xor)
        report = verify_bundle(open_bundle(str(store)), Report(str(store), "bundle", mode), mode)
        assert not report.ok
        assert name in {c.get("part") for c in report.checks if c["status"] == "fail"}
        with pytest.raises(IsepError):
            _join(store)


@settings(max_examples=400, **SETTINGS)
@given(position=st.floats(0, 1), xor=st.integers(1, 255))
def test_any_byte_of_the_manifest_changed_is_caught_or_harmless(position, xor, pristine, original):
    with tempfile.TemporaryDirectory() as tmp:
        _damaged_manifest_is_caught_or_harmless(_corrupt(pristine, tmp, "isep-bundle.json", position, xor),
                                                original)


def _damaged_manifest_is_caught_or_harmless(store: Path, original: bytes) -> None:
    """verify --deep and join agree: both refuse, or join still writes the original archive."""
    try:
        bundle = open_bundle(str(store))
    except IsepError:
        event("refused: the manifest does not parse or is malformed")
        return
    report = verify_bundle(bundle, Report(str(store), "bundle", "deep"), "deep")
    try:
        joined = _join(store)
    except IsepError:
        event("join refused" + ("" if not report.ok else " although verify --deep passed"))
        assert not report.ok, "verify --deep passed a manifest that join refuses"
        return
    event("verify failed, join still wrote the original" if not report.ok
          else "harmless: a field neither verify nor join depends on")
    assert joined == original, "a damaged manifest made join write another archive"


@settings(max_examples=300, **SETTINGS)
@given(pick=st.floats(0, 1), digit=st.sampled_from("0123456789abcdef"))
def test_any_digit_of_the_manifest_changed_is_caught_or_harmless(pick, digit, pristine, original):
    """The same with the JSON kept valid: one hex digit of a hash, size, seq, mode... replaced by
    another (what bit rot in a value, or a careless edit, looks like)."""
    text = (pristine / "isep-bundle.json").read_bytes()
    spots = [i for i, b in enumerate(text) if chr(b) in "0123456789abcdef" and chr(b) != digit]
    at = spots[min(int(pick * len(spots)), len(spots) - 1)]
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        shutil.copytree(pristine, store)
        (store / "isep-bundle.json").write_bytes(text[:at] + digit.encode() + text[at + 1:])
        _damaged_manifest_is_caught_or_harmless(store, original)
