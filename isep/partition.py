"""Deciding what is base, lib and app: by ordered diffID prefix, member by member.

The plan lists, for every part, the stream positions (seq) of the archive members it receives, so
that pack can route each member from its header alone and join can merge parts back in order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import AbstractSet

from .archive import link_target
from .digests import digest_hex
from .errors import Misfit, UsageError
from .legacy import chain_ids
from .names import check_file_name, display_name, part_stem
from .refs import Ref

PLAN_SCHEMA = "isep-plan/1"
EXTENSIONS = {"zstd": ".tar.zst", "gzip": ".tar.gz", "none": ".tar"}
REWRITTEN_METADATA = ("manifest.json", "repositories", "index.json")


def chain_id(diff_ids: list[str]) -> str:
    return chain_ids(diff_ids)[-1]


def first_difference(prefix: list[str], ids: list[str]) -> int | None:
    """Position where ids stops extending prefix, or None when prefix is an ordered prefix of ids."""
    for i, want in enumerate(prefix):
        if i >= len(ids) or ids[i] != want:
            return i
    return None


def _describe_mismatch(who: str, ids: list[str], onto: str, prefix: list[str], pos: int) -> str:
    if pos >= len(ids):
        return (f"{who} is not built on {onto}: it has {len(ids)} layers, {onto} has {len(prefix)}")
    return (f"{who} is not built on {onto}: layer {pos} is {ids[pos]}, {onto} has {prefix[pos]}")


@dataclass
class Split:
    base: list[str]
    lib: list[str]      # the lib's own layers (after the base), empty without a lib

    @property
    def below_app(self) -> int:
        return len(self.base) + len(self.lib)


def check_refs(base: Ref, lib: Ref | None) -> Split:
    if lib is None:
        return Split(base.diff_ids, [])
    pos = first_difference(base.diff_ids, lib.diff_ids)
    if pos is not None:
        raise Misfit(_describe_mismatch(f"lib {lib.display}", lib.diff_ids, f"base {base.display}",
                                        base.diff_ids, pos))
    if len(lib.diff_ids) == len(base.diff_ids):
        raise Misfit(f"lib {lib.display} has the same layers as base {base.display}; leave out --lib")
    return Split(base.diff_ids, lib.diff_ids[len(base.diff_ids):])


def image_role(image: dict, base: Ref, lib: Ref | None, split: Split) -> str:
    """'base' or 'lib' when the image is that image itself, else 'app' (after checking it fits)."""
    ids = image["diff_ids"]
    who = display_name(image)
    if ids == base.diff_ids:
        return "base"
    if lib is not None and ids == lib.diff_ids:
        return "lib"
    pos = first_difference(base.diff_ids, ids)
    if pos is not None:
        raise Misfit(_describe_mismatch(who, ids, f"base {base.display}", base.diff_ids, pos))
    if lib is not None:
        pos = first_difference(lib.diff_ids, ids)
        if pos is not None:
            raise Misfit(_describe_mismatch(who, ids, f"lib {lib.display}", lib.diff_ids, pos))
    if len(ids) <= split.below_app:
        raise Misfit(f"{who} has no layers beyond {'lib' if lib else 'base'}: nothing left for an app part")
    return "app"


def load_renames(doc, compression: str) -> dict[str, str]:
    """isula-build's rename file: [{"name": default, "rename": target}]; targets are checked."""
    if not isinstance(doc, list):
        raise UsageError("--rename: the file must hold a JSON list of {\"name\", \"rename\"} objects")
    renames: dict[str, str] = {}
    for n, item in enumerate(doc):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) \
                or not isinstance(item.get("rename"), str):
            raise UsageError(f"--rename: entry {n} needs string fields \"name\" and \"rename\"")
        problem = check_file_name(item["rename"], f"--rename entry {n}")
        if problem:
            raise UsageError(problem)
        renames.setdefault(item["name"], item["rename"])
    return renames


def _apply_rename(default: str, renames: dict[str, str], compression: str) -> str:
    if default in renames:
        return renames[default]
    isula_name = default[: -len(EXTENSIONS[compression])] + ".tar.gz"  # isula-build's own default
    return renames.get(isula_name, default)


def shared_part_names(base: Ref, lib: Ref | None, compression: str, renames: dict[str, str]) -> dict:
    """File names of the base and lib parts: named after the base and lib images themselves."""
    ext = EXTENSIONS[compression]
    files = {"base": _apply_rename(f"{_ref_stem(base, 'base')}_base_image{ext}", renames, compression)}
    if lib is not None:
        files["lib"] = _apply_rename(f"{_ref_stem(lib, 'lib')}_lib_image{ext}", renames, compression)
    return files


def _ref_stem(ref: Ref, role: str) -> str:
    if ref.name:
        return part_stem(ref.name)
    return f"{role}-{digest_hex(chain_id(ref.diff_ids))[:12]}"


class _Assigner:
    """Which parts receive which member (by stream position)."""

    def __init__(self, members: list[dict]):
        self.members = members
        self.by_name = {m["name"]: m for m in members}
        self.parts: dict[int, AbstractSet[str]] = {}

    def add(self, name: str, part: str) -> None:
        rec = self.by_name.get(name)
        if rec is not None:
            self.parts[rec["seq"]] = self.parts.get(rec["seq"], frozenset()) | {part}

    def add_with_v1_siblings(self, path: str, part: str) -> None:
        self.add(path, part)
        if path.endswith("/layer.tar"):
            folder = path[: -len("layer.tar")]
            for sibling in (folder, folder + "VERSION", folder + "json"):
                self.add(sibling, part)

    def link_target(self, rec: dict) -> dict | None:
        if rec["type"] not in ("symlink", "hardlink"):
            return None
        return self.by_name.get(link_target(rec["name"], rec["link"], rec["type"]))


def _assign(index: dict, roles: list[str], app_parts: dict[int, str], split: Split) -> _Assigner:
    members = index["members"]
    assign = _Assigner(members)
    for k, image in enumerate(index["images"]):
        if roles[k] != "app":
            continue
        for pos, layer in enumerate(image["layers"]):
            group = ("base" if pos < len(split.base) else "lib" if pos < split.below_app else app_parts[k])
            assign.add_with_v1_siblings(layer["path"], group)
            assign.add(layer["member"], group)
        for name in image["owned"] + [image["config"]["member"]]:
            assign.add(name, app_parts[k])
    # v1 directories that no manifest names (containers/image writes them beside <diffID>.tar)
    for rec in members:
        if rec["name"].endswith("/layer.tar") and rec["seq"] not in assign.parts:
            target = assign.link_target(rec)
            if target is not None and target["seq"] in assign.parts:
                for part in assign.parts[target["seq"]]:
                    assign.add_with_v1_siblings(rec["name"], part)
    all_apps = frozenset(app_parts.values())
    only_base, only_lib = frozenset(["base"]), frozenset(["lib"])
    for rec in members:  # one shared set for each outcome: most members are plain app members
        parts = assign.parts.get(rec["seq"])
        if not parts:
            assign.parts[rec["seq"]] = all_apps
        elif "base" in parts:
            assign.parts[rec["seq"]] = only_base
        elif "lib" in parts:
            assign.parts[rec["seq"]] = only_lib
    _close_links(assign, all_apps)
    return assign


def _close_links(assign: _Assigner, app_parts: AbstractSet[str]) -> None:
    """An app part that holds a link also holds its target, unless base or lib carry it."""
    changed = True
    while changed:
        changed = False
        for rec in assign.members:
            target = assign.link_target(rec)
            if target is None:
                continue
            for part in list(assign.parts[rec["seq"]]):
                have = assign.parts[target["seq"]]
                if part in app_parts and not have & {"base", "lib", part}:
                    assign.parts[target["seq"]] = have | {part}  # not in place: sets are shared
                    changed = True


def make_plan(index: dict, base: Ref, lib: Ref | None, *, compression: str = "zstd",
              renames: dict[str, str] | None = None) -> dict:
    split = check_refs(base, lib)
    images = index["images"]
    roles = [image_role(image, base, lib, split) for image in images]
    apps = [k for k, role in enumerate(roles) if role == "app"]
    if not apps:
        raise Misfit("the archive holds only the base or lib image itself: nothing left for an app part")
    renames = renames or {}
    ext = EXTENSIONS[compression]
    app_parts = {k: f"app:{k}" for k in apps}
    assign = _assign(index, roles, app_parts, split)
    files = shared_part_names(base, lib, compression, renames)
    for k in apps:
        image = images[k]
        stem = part_stem(image["tags"][0]) if image["tags"] else f"app-{digest_hex(image['config']['digest'])[:12]}"
        by_tag = next((renames[t] for t in image["tags"] if t in renames), None)
        files[app_parts[k]] = by_tag or _apply_rename(f"{stem}_app_image{ext}", renames, compression)
    _check_unique(files, images, app_parts)
    rewrite = len(images) > 1
    by_seq = {m["seq"]: m for m in index["members"]}
    parts = []
    for part_id, file_name in files.items():
        seqs = sorted(s for s, owners in assign.parts.items() if part_id in owners)
        part = {"id": part_id, "file": file_name, "members": seqs,
                "raw_size": sum(by_seq[s]["raw_size"] for s in seqs)}
        if part_id == "base":
            part.update(role="base", image=base.name, diff_ids=split.base, layers=split.base)
        elif part_id == "lib" and lib is not None:
            part.update(role="lib", image=lib.name, diff_ids=base.diff_ids + split.lib, layers=split.lib)
        else:
            k = int(part_id.split(":")[1])
            image = images[k]
            part.update(role="app", image=image["tags"][0] if image["tags"] else None,
                        layers=image["diff_ids"][split.below_app:], diff_ids=image["diff_ids"])
            if rewrite:
                part["rewrite"] = [s for s in seqs if by_seq[s]["name"] in REWRITTEN_METADATA]
        parts.append(part)
    plan_images = []
    for k in apps:
        image = images[k]
        needed = ["base"] + (["lib"] if lib is not None else []) + [app_parts[k]]
        plan_images.append({
            "tags": image["tags"], "config": image["config"], "platform": image["platform"],
            "diff_ids": image["diff_ids"], "layer_paths": [layer["path"] for layer in image["layers"]],
            "layer_members": [layer["member"] for layer in image["layers"]],
            "legacy_layers": image.get("legacy_layers") or [],
            "owned": image["owned"], "manifest_entry": image.get("manifest_entry"),
            "index_descriptors": image.get("index_descriptors") or [],
            "parts": [files[p] for p in needed], "app_part": files[app_parts[k]],
            "byte_exact": not rewrite,
        })
    return {
        "schema": PLAN_SCHEMA,
        "source": {**index["source"], "format": index["format"]},
        "compression": compression,
        "base": {"name": base.display, "diff_ids": base.diff_ids, "kind": base.kind,
                 "bundle": base.bundle_dir},
        "lib": None if lib is None else {"name": lib.display, "diff_ids": lib.diff_ids, "kind": lib.kind,
                                         "bundle": lib.bundle_dir},
        "parts": parts,
        "images": plan_images,
        "skipped": [{"tags": images[k]["tags"], "reason": f"is the {roles[k]} image itself"}
                    for k in range(len(images)) if roles[k] != "app"],
        "warnings": _shared_app_layer_warnings(images, apps, split),
        "members": _members_with_layer_ids(index),
        "trailer_size": index["source"]["trailer_size"],
    }


def _members_with_layer_ids(index: dict) -> list[dict]:
    """The index's members, those that carry a layer marked with the diffID pack must find. Only
    those are copied: the index's records are the bulk of a plan's memory (docs/formats.md)."""
    members = list(index["members"])
    seq_of = {m["name"]: m["seq"] for m in members}
    for image in index["images"]:
        for layer in image["layers"]:
            seq = seq_of[layer["member"]]
            members[seq] = {**members[seq], "layer_diff_id": layer["diff_id"]}
    return members


def _check_unique(files: dict[str, str], images: list[dict], app_parts: dict[int, str]) -> None:
    owner: dict[str, str] = {}
    for part_id, name in files.items():
        problem = check_file_name(name, f"part {part_id}")
        if problem:
            raise UsageError(problem)
        if name in owner:
            def who(p: str) -> str:
                if p.startswith("app:"):
                    tags = images[int(p.split(":")[1])]["tags"]
                    return tags[0] if tags else p
                return p
            raise UsageError(f"{who(owner[name])} and {who(part_id)} would both be written to {name}; "
                             f"name one with --rename, e.g. [{{\"name\": \"{who(part_id)}\", "
                             f"\"rename\": \"other.tar.zst\"}}]")
        owner[name] = part_id


def _shared_app_layer_warnings(images: list[dict], apps: list[int], split: Split) -> list[str]:
    seen: dict[str, str] = {}
    warnings = []
    for k in apps:
        tag = display_name(images[k])
        for diff in dict.fromkeys(images[k]["diff_ids"][split.below_app:]):
            if diff in seen and seen[diff] != tag:
                warnings.append(f"layer {diff} is in the app parts of both {seen[diff]} and {tag}; "
                                f"a lib image holding it would ship it once")
            seen.setdefault(diff, tag)
    return warnings


def summary_lines(plan: dict) -> list[str]:
    """A human table of the parts and how much of each app's bytes its app part is."""
    lines = [f"{'part':<48} {'role':<5} {'layers':>6} {'bytes':>14}"]
    for part in plan["parts"]:
        lines.append(f"{part['file']:<48} {part['role']:<5} {len(part['layers']):>6} {part['raw_size']:>14,}")
    sizes = {p["file"]: p["raw_size"] for p in plan["parts"]}
    for image in plan["images"]:
        total = sum(sizes[f] for f in image["parts"])
        app = sizes[image["app_part"]]
        name = display_name(image)
        lines.append(f"{name}: app part {app:,} of {total:,} bytes ({100 * app / max(total, 1):.1f}%)")
    lines += [f"note: {s['tags'][0] if s['tags'] else 'an image'} {s['reason']}; not packed as an app"
              for s in plan["skipped"]]
    lines += [f"warning: {w}" for w in plan["warnings"]]
    return lines
