"""Encoding isep's own documents (index, plan, bundle manifest): indented for people, each member
record on one line, and refused when a reader would refuse it (isep.limits).

json.dumps with indent runs Python's pure-Python encoder, which holds a few small strings per
field of every record until the end: about 2.5 KiB per member. The records go through the C
encoder here, one at a time, into one buffer.
"""
from __future__ import annotations

import json
import re
import secrets

from .limits import check_document_size

_compact = json.JSONEncoder(separators=(",", ":")).encode


def encode_document(doc: dict, cap: int, what: str) -> bytearray:
    """doc as indented JSON (and a newline) whose lists of member records ("members" at the top and
    in each of "parts") hold one record per line; BadInput when over cap. A record may be a dict or
    its JSON as bytes already."""
    marker = f"isep-members-{secrets.token_hex(8)}-"
    lists: list[list] = []

    def hole(records) -> object:
        if not isinstance(records, list) or not records:
            return records
        lists.append(records)
        return f"{marker}{len(lists) - 1}"

    skeleton = dict(doc)
    if "members" in doc:
        skeleton["members"] = hole(doc["members"])
    if isinstance(doc.get("parts"), list):
        skeleton["parts"] = [{**part, "members": hole(part.get("members"))} if isinstance(part, dict) else part
                             for part in doc["parts"]]
    pieces = re.split(f'"{marker}([0-9]+)"', json.dumps(skeleton, indent=1) + "\n")
    out = bytearray(pieces[0].encode())
    for n in range(1, len(pieces), 2):  # [text, hole number, text, hole number, ..., text]
        _add_lines(out, lists[int(pieces[n])])
        check_document_size(len(out), cap, what)
        out += pieces[n + 1].encode()
    check_document_size(len(out), cap, what)
    return out


def _add_lines(out: bytearray, records: list) -> None:
    if not isinstance(records[0], (dict, bytes)):  # member numbers: one line
        out += _compact(records).encode()
        return
    out += b"["
    for n, rec in enumerate(records):
        out += b",\n" if n else b"\n"
        out += rec if isinstance(rec, bytes) else _compact(rec).encode()
    out += b"\n]"
