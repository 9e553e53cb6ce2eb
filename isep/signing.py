"""Signed bundles: an SSH signature (`ssh-keygen -Y sign`, namespace "isep") over the exact bytes of
isep-bundle.json, stored beside it as isep-bundle.json.sig. The manifest holds the size and sha256
of every part and the digests of every member, so a valid signature vouches for the whole bundle.

    sign_manifest(manifest_bytes, key_path) -> armored signature bytes
    verify_manifest(manifest_bytes, signature, allowed_signers_path) -> the signer's principal

Keys and the allowed-signers file are OpenSSH's own (see ssh-keygen(1), "ALLOWED SIGNERS"); the
namespace keeps an isep signature from being valid for anything else, and the reverse.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

from .errors import EnvironmentFailure, IntegrityError
from .names import SIGNATURE_FILE

NAMESPACE = "isep"
ARMOR = b"-----BEGIN SSH SIGNATURE-----"
MAX_SIGNATURE = 64 << 10
TIMEOUT = 60


def _ssh_keygen() -> str:
    path = shutil.which("ssh-keygen")
    if path is None:
        raise EnvironmentFailure("ssh-keygen not found: install OpenSSH (8.2 or later) to sign or verify bundles")
    return path


def _run(args: list[str], data: bytes | bytearray | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([_ssh_keygen(), *args], input=data if data is not None else b"",
                              capture_output=True, timeout=TIMEOUT, env=_env())
    except subprocess.TimeoutExpired:
        raise EnvironmentFailure(f"ssh-keygen {args[0]} {args[1]} did not finish in {TIMEOUT} s "
                                 f"(a passphrase prompt? use ssh-agent)") from None
    except OSError as exc:
        raise EnvironmentFailure(f"cannot run ssh-keygen: {exc.strerror or exc}") from None


def _env() -> dict:
    env = dict(os.environ)
    env.pop("SSH_ASKPASS_REQUIRE", None)
    env.setdefault("LC_ALL", "C")
    return env


def _first_line(raw: bytes) -> str:
    lines = [line.strip() for line in raw.decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[0] if lines else "no message"


def sign_manifest(manifest_bytes: bytes | bytearray, key_path: str) -> bytes:
    """The armored SSH signature of manifest_bytes made with the private key at key_path (or the
    agent's key for a public key_path), namespace "isep"."""
    if not os.path.isfile(key_path):
        raise EnvironmentFailure(f"cannot read signing key {key_path}: no such file")
    proc = _run(["-Y", "sign", "-n", NAMESPACE, "-f", key_path], manifest_bytes)
    if proc.returncode != 0 or not proc.stdout.startswith(ARMOR):
        raise EnvironmentFailure(f"cannot sign with {key_path}: {_first_line(proc.stderr)}")
    return proc.stdout


def verify_manifest(manifest_bytes: bytes, signature: bytes | None, allowed_signers_path: str) -> str:
    """The principal (from allowed_signers_path) whose key made signature over manifest_bytes in
    the "isep" namespace. IntegrityError when the bundle is unsigned, signed by a key the file does
    not list, or the signature does not match (the manifest was changed after signing)."""
    if not os.path.isfile(allowed_signers_path):
        raise EnvironmentFailure(f"cannot read allowed signers file {allowed_signers_path}: no such file")
    try:
        with open(allowed_signers_path, "rb"):
            pass
    except OSError as exc:
        raise EnvironmentFailure(f"cannot read allowed signers file {allowed_signers_path}: {exc.strerror}") from None
    if not signature:
        raise IntegrityError(f"unsigned: the bundle has no {SIGNATURE_FILE}")
    if len(signature) > MAX_SIGNATURE or not signature.lstrip().startswith(ARMOR):
        raise IntegrityError(f"{SIGNATURE_FILE} is not an SSH signature")
    with tempfile.TemporaryDirectory(prefix="isep-sig-") as tmp:
        sig_path = os.path.join(tmp, SIGNATURE_FILE)
        with open(sig_path, "wb") as fh:
            fh.write(signature)
        found = _run(["-Y", "find-principals", "-s", sig_path, "-f", allowed_signers_path])
        principals = [p.strip() for p in found.stdout.decode("utf-8", "replace").splitlines() if p.strip()]
        if found.returncode != 0 or not principals:
            raise IntegrityError(f"signed by a key that {allowed_signers_path} does not list "
                                 f"(or an unreadable signature)")
        reasons = []
        for principal in principals:
            proc = _run(["-Y", "verify", "-f", allowed_signers_path, "-I", principal, "-n", NAMESPACE,
                         "-s", sig_path], manifest_bytes)
            if proc.returncode == 0:
                return principal
            reasons.append(_first_line(proc.stderr))
    raise IntegrityError("bad signature: isep-bundle.json was changed after it was signed, or the "
                         f"signature is not for isep ({reasons[0]})")
