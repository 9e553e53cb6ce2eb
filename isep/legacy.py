"""Legacy (v1) layer IDs and Go-style JSON, as containers/image and isula-build write them."""
from __future__ import annotations

import hashlib
import json


def gojson(obj, indent: int | None = None) -> bytes:
    """json.Marshal (or MarshalIndent) as Go does it: key order as given (pass dicts in
    Go struct order; sort map keys yourself), compact, UTF-8, HTML-escaped."""
    if indent is None:
        s = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    else:
        s = json.dumps(obj, indent=indent, ensure_ascii=False)
    s = (s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
         .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))
    return s.encode("utf-8")


def sorted_map(d: dict | None):
    return None if d is None else {k: d[k] for k in sorted(d)}


def chain_ids(ids: list[str]) -> list[str]:
    out: list[str] = []
    for d in ids:
        if not out:
            out.append(d)
        else:
            out.append("sha256:" + hashlib.sha256((out[-1] + " " + d).encode()).hexdigest())
    return out


def podman_v1_from_config(cfg: dict) -> list[tuple[str, bytes]]:
    """containers/image (5.23) legacy layer ids: sha256 of the layer's legacy config
    (parent, and for the top layer seven attributes copied from the image config) plus
    ``layer_id`` = chainID, as a sorted Go map; the json written adds ``id``."""
    ids = cfg["rootfs"]["diff_ids"]
    chains = chain_ids(ids)
    out = []
    parent = ""
    for i in range(len(ids)):
        lc: dict = {}
        if parent:
            lc["parent"] = parent
        if i == len(ids) - 1:
            for attr in ("architecture", "config", "container", "container_config", "created",
                         "docker_version", "os"):
                lc[attr] = cfg.get(attr)
        lid = hashlib.sha256(gojson(sorted_map({**lc, "layer_id": chains[i]}))).hexdigest()
        lc["id"] = lid
        out.append((lid, gojson(sorted_map(lc))))
        parent = lid
    return out
