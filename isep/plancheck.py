"""A plan given to isep-pack --plan is untrusted input: a file anyone may have edited; so is the
index given to isep-partition (check_index: the fields make_plan reads).

check_plan refuses (BadInput, naming the field) anything make_plan would not have written that pack
relies on: wrong types or schema, member numbers out of range or repeated, and layers routed to a
part their role does not allow. A plan that passes yields a bundle that verify and join accept:
an edited plan must not make pack write a bundle called complete that join then refuses, nor put
an app's private layer into a base part that other apps' bundles then ship.
"""
from __future__ import annotations

from .archive import FORMATS
from .errors import BadInput
from .fields import DIGEST, Fields
from .limits import MAX_MEMBERS, MAX_TRAILER
from .names import check_file_name
from .partition import EXTENSIONS, PLAN_SCHEMA

ROLES = ("base", "lib", "app")


def check_plan(plan: object, what: str, *, isula: bool = False) -> dict:
    """The plan, when pack may execute it (ISULA: in isula-build's layout, which also needs each
    image's legacy layer IDs); BadInput naming the first field that is wrong."""
    top = Fields(plan, "plan", what)
    if top.doc.get("schema") != PLAN_SCHEMA:
        raise BadInput(f"{what} is not an isep plan (schema {PLAN_SCHEMA}; make one with isep-partition)")
    top.choice("compression", EXTENSIONS, f"is not one of {', '.join(EXTENSIONS)}")
    source = Fields(top.get("source", dict), "plan.source", what)
    source.choice("format", FORMATS, "is not a format isep reads")
    trailer = top.count("trailer_size", 1024, MAX_TRAILER)
    if trailer % 512:
        top.fail("trailer_size", "is not a whole number of 512-byte blocks")
    count = _check_members(top, what)
    base = _check_stack(top, "base", what) or []  # required: None only when optional
    lib = _check_stack(top, "lib", what, optional=True)
    top.doc.setdefault("lib", None)  # left out: no lib, as isep-partition writes it (null)
    if lib is not None and lib[:len(base)] != base:
        top.fail("lib.diff_ids", "do not extend the base's")
    parts = [_check_part(p, n, count, what) for n, p in enumerate(top.get("parts", list))]
    _check_roles(parts, base, lib, what)
    _check_images(top, parts, base, lib, what, isula)
    _check_routing(plan, parts, base, lib, what)  # type: ignore[arg-type]
    return plan  # type: ignore[return-value]


def check_index(index: object, what: str) -> dict:
    """An index isep-partition may plan from; BadInput naming the first field that is wrong."""
    top = Fields(index, "index", what)
    if not str(top.doc.get("schema", "")).startswith("isep-index/"):
        raise BadInput(f"{what} is not an isep index (make one with isep-index)")
    source = Fields(top.get("source", dict), "index.source", what)
    source.count("trailer_size", 1024, MAX_TRAILER)
    top.choice("format", FORMATS, "is not a format isep reads")
    _check_members(top, what, "index")
    names = {rec["name"] for rec in top.doc["members"]}
    for rec in top.doc["members"]:
        if rec["type"] in ("symlink", "hardlink") and not isinstance(rec.get("link"), str):
            raise BadInput(f"{what}: index.members[{rec['seq']}].link is not a string")
    for n, doc in enumerate(top.get("images", list)):
        image = Fields(doc, f"index.images[{n}]", what)
        ids = image.strings("diff_ids", pattern=DIGEST)
        image.strings("tags")
        image.strings("owned")
        image.get("platform", dict)
        config = Fields(image.get("config", dict), f"index.images[{n}].config", what)
        if config.get("member", str) not in names:
            config.fail("member", "is not a member of the archive")
        config.get("digest", str, optional=True)
        layers = image.get("layers", list)
        if len(layers) != len(ids):
            image.fail("layers", "does not list one entry per diffID")
        for k, layer_doc in enumerate(layers):
            layer = Fields(layer_doc, f"index.images[{n}].layers[{k}]", what)
            layer.get("path", str)
            if layer.get("member", str) not in names:
                layer.fail("member", "is not a member of the archive")
            if layer.get("diff_id", str) != ids[k]:
                layer.fail("diff_id", "is not the image's diffID at that position")
        _check_legacy(image, required=False)
    return index  # type: ignore[return-value]


def _check_members(top: Fields, what: str, doc_name: str = "plan") -> int:
    members = top.get("members", list)
    if len(members) > MAX_MEMBERS:
        top.fail("members", f"lists {len(members):,} members, over the {MAX_MEMBERS:,} isep supports")
    for seq, doc in enumerate(members):
        rec = Fields(doc, f"{doc_name}.members[{seq}]", what)
        if rec.count("seq") != seq:
            rec.fail("seq", f"is not {seq}: members are listed in stream order")
        rec.get("name", str)
        rec.get("type", str)
        rec.count("size")
        rec.count("offset")
        rec.count("raw_size")
        for key in ("sha256", "layer_diff_id"):
            value = rec.get(key, str, optional=True)
            if value is not None and not DIGEST.fullmatch(value):
                rec.fail(key, "is not a sha256 digest")
    return len(members)


def _check_stack(top: Fields, key: str, what: str, optional: bool = False) -> list[str] | None:
    doc = top.get(key, dict, optional=optional)
    if doc is None:
        return None
    ref = Fields(doc, f"plan.{key}", what)
    ref.get("name", str)
    return ref.strings("diff_ids", pattern=DIGEST)


def _check_part(doc: object, n: int, count: int, what: str) -> dict:
    part = Fields(doc, f"plan.parts[{n}]", what)
    problem = check_file_name(part.doc.get("file"), f"{what}: plan.parts[{n}].file")
    if problem:
        raise BadInput(problem)
    if part.doc.get("role") not in ROLES:
        part.fail("role", "is not base, lib or app")
    seqs = part.numbers("members", count)
    rewrite = part.numbers("rewrite", count, optional=True)
    if not set(rewrite) <= set(seqs):
        part.fail("rewrite", "names a member the part does not hold")
    part.strings("diff_ids", pattern=DIGEST)
    part.strings("layers", pattern=DIGEST)
    part.get("id", str)
    part.get("image", str, optional=True)
    if part.doc["role"] == "app" and not seqs:
        part.fail("members", "is empty: an app part holds at least the image's config and metadata")
    if part.doc["role"] != "app" and rewrite:
        part.fail("rewrite", "is only for app parts")
    return part.doc


def _check_roles(parts: list[dict], base: list[str] | None, lib: list[str] | None, what: str) -> None:
    files = [p["file"] for p in parts]
    if len(set(files)) != len(files):
        raise BadInput(f"{what}: plan.parts names one file twice")
    roles = [p["role"] for p in parts]
    if roles.count("base") != 1 or roles.count("lib") != (lib is not None) or "app" not in roles:
        raise BadInput(f"{what}: plan.parts must be one base part, {'one lib part, ' if lib else ''}"
                       f"and app parts, one per image")
    for n, part in enumerate(parts):
        if part["role"] == "base" and (part["diff_ids"] != base or part["layers"] != base):
            raise BadInput(f"{what}: plan.parts[{n}] (base) does not carry exactly plan.base.diff_ids")
        if part["role"] == "lib" and lib is not None and (
                part["diff_ids"] != lib or part["layers"] != lib[len(base or []):]):
            raise BadInput(f"{what}: plan.parts[{n}] (lib) does not carry exactly plan.lib.diff_ids")


def _check_images(top: Fields, parts: list[dict], base: list[str], lib: list[str] | None, what: str,
                  isula: bool) -> None:
    by_file = {p["file"]: p for p in parts}
    below = len(lib if lib is not None else base)
    images = top.get("images", list)
    apps = [p["file"] for p in parts if p["role"] == "app"]
    if sorted(Fields(im, f"plan.images[{n}]", what).get("app_part", str) for n, im in enumerate(images)) \
            != sorted(apps):
        top.fail("images", "do not name each app part once as their app_part")
    for n, doc in enumerate(images):
        image = Fields(doc, f"plan.images[{n}]", what)
        ids = image.strings("diff_ids", pattern=DIGEST)
        if ids[:below] != (lib if lib is not None else base) or len(ids) == below:
            image.fail("diff_ids", "do not extend the base's (and lib's) with app layers")
        for key in ("layer_paths", "layer_members"):
            if len(image.strings(key, optional=key == "layer_members")) not in (len(ids), 0):
                image.fail(key, "does not list one entry per layer")
        image.strings("tags")
        image.get("byte_exact", bool)
        image.get("platform", dict)
        config = Fields(image.get("config", dict), f"plan.images[{n}].config", what)
        config.get("member", str)
        if not DIGEST.fullmatch(config.get("digest", str)):
            config.fail("digest", "is not a sha256 digest")
        _check_legacy(image, required=isula)
        app = by_file[doc["app_part"]]
        if app["diff_ids"] != ids or app["layers"] != ids[below:]:
            image.fail("app_part", "names a part that does not carry this image's app layers")
        want = [p["file"] for p in parts if p["role"] != "app"] + [doc["app_part"]]
        if image.strings("parts") != want:
            image.fail("parts", f"is not the base{', lib' if lib is not None else ''} and app part files")


def _check_legacy(image: Fields, *, required: bool) -> None:
    pairs = image.get("legacy_layers", list, optional=not required)
    for n, pair in enumerate(pairs or []):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            image.fail(f"legacy_layers[{n}]", "is not a [layer ID, JSON] pair")
    if pairs is not None and len(pairs) != len(image.doc.get("diff_ids") or []):  # --format isula zips them
        image.fail("legacy_layers", "does not have one entry per layer")


def _check_routing(plan: dict, parts: list[dict], base: list[str], lib: list[str] | None, what: str) -> None:
    """Each layer member sits in the part its role allows, config and metadata in the app parts,
    and every member in some part."""
    members = plan["members"]
    owners: dict[int, list[dict]] = {}
    for part in parts:
        for seq in part["members"]:
            owners.setdefault(seq, []).append(part)
    base_ids = set(base)
    lib_ids = set(lib[len(base):]) if lib is not None else set()
    for seq, rec in enumerate(members):
        held = owners.get(seq)
        if not held:
            raise BadInput(f"{what}: plan.members[{seq}] ({rec['name']!r}) is in no part")
        roles = {p["role"] for p in held}
        if len(held) > 1 and roles != {"app"}:
            raise BadInput(f"{what}: plan.members[{seq}] ({rec['name']!r}) is in a base or lib part and "
                           f"in another part")
        layer = rec.get("layer_diff_id")
        if layer is None:
            continue
        allowed = "base" if layer in base_ids else "lib" if layer in lib_ids else "app"
        if roles != {allowed}:
            raise BadInput(f"{what}: plan.members[{seq}] ({rec['name']!r}) carries a {allowed} layer "
                           f"but is routed to the {'/'.join(sorted(roles))} part")
    by_name = {rec["name"]: seq for seq, rec in enumerate(members)}
    for n, image in enumerate(plan["images"]):
        seq = by_name.get(image["config"]["member"])
        if seq is None or image["app_part"] not in {p["file"] for p in owners.get(seq, [])}:
            raise BadInput(f"{what}: plan.images[{n}].config.member is not a member of its app part")
