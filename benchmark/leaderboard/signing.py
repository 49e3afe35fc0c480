"""The board's signature on a verification: Ed25519 (through the ``cryptography`` library).

Verification is something the board's maintainers do. The block a verification writes into an
entry is signed with the board's private key, over the canonical JSON of the block without its
signature: the entry's hash, the verification records' hash, the seeds, the data and transform,
the figures and the verdict. Anyone can check it; only the key's holder can make it.

* ``leaderboards/keys/<name>.pub`` (shipped with the package as ``leakbench/leaderboard/keys``)
  holds the public keys the board trusts, one per file: ``ed25519 <64 hex digits> <name>``. An
  entry shows "verified" only when its block is signed by one of them; a block signed by
  anyone else, or not at all, is refused when the entry is loaded, with the reason.
* The private key lives outside the repository: a PEM file named by ``--key`` or by the
  environment variable ``LEAKBENCH_BOARD_KEY_FILE`` (in CI, a secret written to such a file).
  ``leakbench leaderboard keygen`` makes a pair.

A key is known by its id, the first 16 hex digits of the SHA-256 of its 32 raw bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from leakbench.leaderboard.entry import PACKAGE_DIR, EntryError

KEYS = PACKAGE_DIR / "keys"
KEY_FILE_ENV = "LEAKBENCH_BOARD_KEY_FILE"
ALGORITHM = "ed25519"


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public: Ed25519PublicKey) -> str:
    return hashlib.sha256(_raw(public)).hexdigest()[:16]


def signed_bytes(block: Mapping[str, Any]) -> bytes:
    """What a signature covers: the block without its signature, as canonical JSON."""
    payload = {k: v for k, v in block.items() if k != "signature"}
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


def trusted_keys(keys_dir: Path = KEYS) -> dict[str, Ed25519PublicKey]:
    """The public keys in ``keys_dir`` by id; a malformed key file is refused by name."""
    keys = {}
    for path in sorted(Path(keys_dir).glob("*.pub")):
        fields = path.read_text().split()
        try:
            if fields[0] != ALGORITHM:
                raise ValueError(f"algorithm {fields[0]!r}")
            public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(fields[1]))
        except (IndexError, ValueError) as exc:
            raise EntryError(
                f"{path}: not a board key ({exc}); expected 'ed25519 <64 hex digits> <name>'"
            ) from None
        keys[key_id(public)] = public
    return keys


def check_signature(block: Mapping[str, Any], keys_dir: Path = KEYS) -> str:
    """Refuse a block that is not signed by a trusted key; returns the signing key's id."""
    signature = block.get("signature")
    if not isinstance(signature, Mapping):
        raise EntryError("its verification block is not signed: only the board verifies")
    keys = trusted_keys(keys_dir)
    public = keys.get(str(signature.get("key")))
    if public is None:
        raise EntryError(
            f"its verification is signed by key {signature.get('key')!r}, which the board does "
            f"not trust (trusted: {', '.join(sorted(keys)) or 'none'} in {keys_dir})"
        )
    try:
        public.verify(bytes.fromhex(str(signature.get("value"))), signed_bytes(block))
    except (InvalidSignature, ValueError):
        raise EntryError(
            "its verification block does not match the board's signature (changed after "
            "signing, or copied from another entry)"
        ) from None
    return str(signature["key"])


def load_private_key(path: str | Path | None = None) -> Ed25519PrivateKey:
    """The board's private key from ``path`` or ``$LEAKBENCH_BOARD_KEY_FILE``."""
    path = path or os.environ.get(KEY_FILE_ENV)
    if not path:
        raise EntryError(
            "verification is signed with the board's private key: pass --key FILE or set "
            f"{KEY_FILE_ENV} (leakbench leaderboard keygen makes one)"
        )
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise EntryError(f"{path}: not a readable Ed25519 private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise EntryError(f"{path}: the board's key must be Ed25519, not {type(key).__name__}")
    return key


def sign(block: Mapping[str, Any], key: Ed25519PrivateKey) -> dict[str, str]:
    """The signature of ``block`` (its ``signature`` field, if any, left out)."""
    return {
        "algorithm": ALGORITHM,
        "key": key_id(key.public_key()),
        "value": key.sign(signed_bytes(block)).hex(),
    }


def generate_key(private_path: str | Path, name: str, keys_dir: Path = KEYS) -> tuple[str, Path]:
    """Write a new private key (mode 0600) to ``private_path`` and its public half to
    ``keys_dir/<name>.pub``; returns the key's id and the public file. Never overwrites."""
    private_path, public_path = Path(private_path), Path(keys_dir) / f"{name}.pub"
    repository = PACKAGE_DIR.parents[1]
    if (repository / "pyproject.toml").is_file() and repository in private_path.resolve().parents:
        raise EntryError(
            f"{private_path} is inside the repository: the private key must live outside it"
        )
    for path in (private_path, public_path):
        if path.exists():
            raise EntryError(f"{path} exists; a key is never overwritten")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    private_path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(
        private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR
    )
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(pem)
    public_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.write_text(f"{ALGORITHM} {_raw(key.public_key()).hex()} {name}\n")
    return key_id(key.public_key()), public_path
