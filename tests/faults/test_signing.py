"""Signed bundles: isep.signing with keys made by ssh-keygen in temporary directories, and the CLI
options that use it (isep-pack --sign KEY; isep-verify/isep-join --trust ALLOWED_SIGNERS)."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from isep.errors import EnvironmentFailure, IntegrityError
from isep.signing import NAMESPACE, SIGNATURE_FILE, sign_manifest, verify_manifest

from . import craft
from tests.harness import bundle_doc, is_complete_archive, pack_args, part_files, run

# Skipped on a machine without OpenSSH; in CI (CI set) the tests run and fail instead.
pytestmark = pytest.mark.skipif(shutil.which("ssh-keygen") is None and not os.environ.get("CI"),
                                reason="ssh-keygen (OpenSSH) is not installed")

MANIFEST = b'{"schema": "isep-bundle/1", "parts": [], "images": []}\n'


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """alice and bob (ed25519), carol (ecdsa); allowed: alice and carol for isep, bob for git only."""
    d = tmp_path_factory.mktemp("keys")
    for name, kind in (("alice", "ed25519"), ("bob", "ed25519"), ("carol", "ecdsa")):
        subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", name, "-f", str(d / name)], check=True)
    pub = lambda n: " ".join((d / f"{n}.pub").read_text().split()[:2])  # noqa: E731
    (d / "allowed").write_text(f"alice@example.org {pub('alice')}\n"
                               f'carol@example.org namespaces="isep" {pub("carol")}\n'
                               f'bob@example.org namespaces="git" {pub("bob")}\n')
    (d / "only-bob").write_text(f"bob@example.org {pub('bob')}\n")
    return d


# --- isep.signing ----------------------------------------------------------------------------------------

def test_sign_and_verify(keys):
    sig = sign_manifest(MANIFEST, str(keys / "alice"))
    assert sig.startswith(b"-----BEGIN SSH SIGNATURE-----") and sig.rstrip().endswith(b"-----END SSH SIGNATURE-----")
    assert verify_manifest(MANIFEST, sig, str(keys / "allowed")) == "alice@example.org"


def test_namespace_restricted_key(keys):
    sig = sign_manifest(MANIFEST, str(keys / "carol"))
    assert verify_manifest(MANIFEST, sig, str(keys / "allowed")) == "carol@example.org"


def test_key_allowed_for_another_namespace_only(keys):
    sig = sign_manifest(MANIFEST, str(keys / "bob"))
    with pytest.raises(IntegrityError):
        verify_manifest(MANIFEST, sig, str(keys / "allowed"))


def test_unsigned(keys):
    for missing in (None, b""):
        with pytest.raises(IntegrityError, match="unsigned"):
            verify_manifest(MANIFEST, missing, str(keys / "allowed"))


def test_unknown_key(keys):
    sig = sign_manifest(MANIFEST, str(keys / "alice"))
    with pytest.raises(IntegrityError, match="does not list"):
        verify_manifest(MANIFEST, sig, str(keys / "only-bob"))


@pytest.mark.parametrize("edit", [lambda m: m + b" ", lambda m: m.replace(b"[]", b"[{}]", 1), lambda m: b""])
def test_manifest_changed_after_signing(edit, keys):
    sig = sign_manifest(MANIFEST, str(keys / "alice"))
    with pytest.raises(IntegrityError, match="bad signature"):
        verify_manifest(edit(MANIFEST), sig, str(keys / "allowed"))


def test_signature_made_for_another_namespace(keys, tmp_path):
    data = tmp_path / "m"
    data.write_bytes(MANIFEST)
    subprocess.run(["ssh-keygen", "-q", "-Y", "sign", "-n", "file", "-f", str(keys / "alice"), str(data)],
                   check=True, capture_output=True)
    sig = (tmp_path / "m.sig").read_bytes()
    with pytest.raises(IntegrityError, match="bad signature"):
        verify_manifest(MANIFEST, sig, str(keys / "allowed"))


@pytest.mark.parametrize("garbage", [b"junk", b"-----BEGIN SSH SIGNATURE-----\nAAAA\n-----END SSH SIGNATURE-----\n",
                                     b"-----BEGIN SSH SIGNATURE-----\n" + b"A" * (70 << 10)])
def test_garbage_signature(garbage, keys):
    with pytest.raises(IntegrityError):
        verify_manifest(MANIFEST, garbage, str(keys / "allowed"))


def test_tampered_signature_bytes(keys):
    sig = bytearray(sign_manifest(MANIFEST, str(keys / "alice")))
    body = sig.index(b"\n", 10) + 40  # a byte of the base64 body
    sig[body] = ord("A") if sig[body] != ord("A") else ord("B")
    with pytest.raises(IntegrityError):
        verify_manifest(MANIFEST, bytes(sig), str(keys / "allowed"))


def test_missing_files_are_environment_failures(keys, tmp_path):
    with pytest.raises(EnvironmentFailure):
        sign_manifest(MANIFEST, str(tmp_path / "no-such-key"))
    with pytest.raises(EnvironmentFailure):
        verify_manifest(MANIFEST, b"x", str(tmp_path / "no-such-allowed-signers"))


def test_public_key_without_agent_cannot_sign(keys, monkeypatch, tmp_path):
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    shutil.copyfile(keys / "alice.pub", tmp_path / "alice.pub")  # no private half beside it
    with pytest.raises(EnvironmentFailure, match="cannot sign"):
        sign_manifest(MANIFEST, str(tmp_path / "alice.pub"))


def test_missing_ssh_keygen(keys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EnvironmentFailure, match="ssh-keygen not found"):
        sign_manifest(MANIFEST, str(keys / "alice"))
    with pytest.raises(EnvironmentFailure, match="ssh-keygen not found"):
        verify_manifest(MANIFEST, b"-----BEGIN SSH SIGNATURE-----", str(keys / "allowed"))


def test_principal_names_are_not_options(keys, tmp_path):
    """A principal that looks like an option is passed as data, never parsed as a flag."""
    pub = " ".join((keys / "alice.pub").read_text().split()[:2])
    allowed = tmp_path / "allowed"
    allowed.write_text(f"-Overify-time=19700101 {pub}\n")
    sig = sign_manifest(MANIFEST, str(keys / "alice"))
    assert verify_manifest(MANIFEST, sig, str(allowed)) == "-Overify-time=19700101"


def test_namespace_is_isep():
    assert NAMESPACE == "isep" and SIGNATURE_FILE == "isep-bundle.json.sig"


# --- the CLI: pack --sign, verify/join --trust -----------------------------------------------------------------

@pytest.fixture
def signed(keys, samples, sb):
    s = samples["docker-oci"]
    store = sb.work / "store"
    run("pack", *pack_args(s), "-o", store, "--sign", keys / "alice", sandbox=sb, out=store)
    return store


def test_pack_sign_writes_the_signature(signed, keys):
    sig = (signed / SIGNATURE_FILE).read_bytes()
    manifest = (signed / "isep-bundle.json").read_bytes()
    assert verify_manifest(manifest, sig, str(keys / "allowed")) == "alice@example.org"
    assert not [p for p in signed.iterdir() if p.name.startswith(".isep-tmp-")]


def test_trusted_bundle_verifies_and_joins(signed, keys, samples, sb):
    res = run("verify", "--trust", keys / "allowed", signed, sandbox=sb)
    assert res.json["ok"]
    joined = run("join", "--trust", keys / "allowed", signed, sandbox=sb).stdout
    assert joined == samples["docker-oci"]["app1"].read_bytes()


def test_pack_sign_with_a_missing_key_writes_nothing(keys, samples, sb):
    run("pack", *pack_args(samples["docker-oci"]), "-o", sb.out, "--sign", keys / "nobody", expect=3, sandbox=sb)
    assert not (sb.out / "isep-bundle.json").exists()


def _unsigned(signed):
    (signed / SIGNATURE_FILE).unlink()


def _unknown_key(signed, keys):
    manifest = (signed / "isep-bundle.json").read_bytes()
    (signed / SIGNATURE_FILE).write_bytes(sign_manifest(manifest, str(keys / "bob")))


def _edited(signed):
    craft.edit_manifest(signed, lambda doc: doc["images"][0]["tags"].__setitem__(0, "evil/app:1"))


def _part_replaced(signed, samples, sb):
    """The app part swapped for another release's under the same name, its manifest entries
    rewritten to match: a bundle that verifies, of which only the signature can tell."""
    other = sb.work / "other"
    run("pack", *pack_args(samples["docker-oci"], "app1-2"), "-o", other, sandbox=sb, out=other)
    other_doc = bundle_doc(other)
    entry = next(p for p in other_doc["parts"] if p["role"] == "app")
    image = other_doc["images"][0]
    name = part_files(signed)["app"]
    shutil.copyfile(other / entry["file"], signed / name)
    image["parts"] = [name if f == entry["file"] else f for f in image["parts"]]
    image["app_part"] = name
    entry["file"] = name

    def swap(doc):
        doc["parts"] = [entry if p["role"] == "app" else p for p in doc["parts"]]
        doc["images"] = [image]
    craft.edit_manifest(signed, swap)
    shutil.rmtree(other)
    run("verify", signed, sandbox=sb)  # sound as a bundle


@pytest.mark.parametrize("case", ["unsigned", "unknown-key", "edited-after-signing", "part-replaced",
                                  "signature-garbage"])
def test_trust_refuses(case, signed, keys, samples, sb):
    if case == "unsigned":
        _unsigned(signed)
    elif case == "unknown-key":
        _unknown_key(signed, keys)
    elif case == "edited-after-signing":
        _edited(signed)
    elif case == "part-replaced":
        _part_replaced(signed, samples, sb)
    else:
        (signed / SIGNATURE_FILE).write_bytes(b"not a signature\n")
    run("verify", "--trust", keys / "allowed", signed, expect=5, report=True, sandbox=sb)
    out = run("join", "--trust", keys / "allowed", signed, expect=5, sandbox=sb)
    assert not is_complete_archive(out.stdout)
    sb.out.mkdir(exist_ok=True)
    run("join", "--trust", keys / "allowed", signed, "-o", sb.out / "joined.tar", expect=5, sandbox=sb,
        out=sb.out / "joined.tar")
    assert not (sb.out / "joined.tar").exists()


def test_trust_with_a_missing_allowed_signers_file(signed, sb):
    run("verify", "--trust", sb.work / "missing", signed, expect=3, sandbox=sb)
    run("join", "--trust", sb.work / "missing", signed, expect=3, sandbox=sb)
