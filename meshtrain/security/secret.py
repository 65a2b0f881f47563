"""The mesh secret: where it lives, how it travels (join tokens), and rotation (the keyring).

A mesh is the set of nodes that share a 32-byte secret. Resolution order,
first match wins: an explicit ``--secret-file``, the ``MESHTRAIN_SECRET``
environment variable (how an agent hands the secret to its workers), then
the user's config file (``$MESHTRAIN_HOME/secret``, else
``$XDG_CONFIG_HOME/meshtrain/secret``, else ``~/.config/meshtrain/secret``),
created with 0600 permissions on first use.

A secret source holds one or more keys (lines of a file, commas in the
variable): like memberlist's keyring, a node sends with the first and
accepts any, so a mesh rotates by adding the new key everywhere, making it
first everywhere, then removing the old one.

Keys are written as ``mk1.<base64url>``; a join token is
``mt1.<base64url(version | secret | seed address | checksum)>``: one word
that survives copy-paste, with a checksum so a mangled token is a one-line
UserError instead of a silently different mesh.

Encryption (`meshtrain join --encrypt`) is a property of the mesh, so it
travels with the secret: the keyring's `encrypt` flag is the word
``encrypt`` among the keys (a line of the file, an item of the variable), and
a token of an encrypted mesh is version 2 (version | flags | secret | seed |
checksum), so every joiner encrypts too. A node whose setting differs from
the mesh's cannot talk to it: its packets are dropped as `mode_mismatch`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from meshtrain import env as env_names
from meshtrain.errors import UserError

ENV_SECRET = env_names.SECRET
ENV_HOME = env_names.HOME
SECRET_BYTES = 32
KEY_ID_BYTES = 4
KEY_PREFIX = "mk1."
TOKEN_PREFIX = "mt1."
_TOKEN_VERSION = 1  # version | secret | seed | checksum: a mesh without encryption
_TOKEN_VERSION_FLAGS = 2  # version | flags | secret | seed | checksum
_FLAG_ENCRYPT = 0x01
ENCRYPT_WORD = "encrypt"  # the keyring's encrypt flag in a secret file or MESHTRAIN_SECRET
_CHECKSUM_BYTES = 4
_MAX_SEED = 255


def generate_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


_B64URL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    if not text or not set(text) <= _B64URL:
        raise ValueError("not base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64(data) != text:  # non-canonical (stray padding bits): a mangled copy, not the same bytes
        raise ValueError("not canonical base64url")
    return data


def encode_key(key: bytes) -> str:
    """The text form of one key, as stored in a secret file or MESHTRAIN_SECRET."""
    return KEY_PREFIX + _b64(key)


def decode_key(text: str, where: str) -> bytes:
    text = text.strip()
    if not text.startswith(KEY_PREFIX):
        raise UserError(f"{where}: a mesh key starts with {KEY_PREFIX!r} (got {text[:8]!r}...)")
    try:
        key = _unb64(text[len(KEY_PREFIX) :])
    except (ValueError, binascii.Error):
        raise UserError(f"{where}: the mesh key is not valid base64url") from None
    if len(key) != SECRET_BYTES:
        raise UserError(f"{where}: a mesh key is {SECRET_BYTES} bytes, this one is {len(key)}")
    return key


def key_id(key: bytes) -> bytes:
    """A short public name of a key, so a receiver runs one HMAC, not one per key it holds.

    A one-way function of the key: it reveals nothing usable, only which key to try.
    """
    return hmac.new(key, b"meshtrain key id", hashlib.sha256).digest()[:KEY_ID_BYTES]


class Keyring:
    """The keys of a mesh: send with the first (`primary`), accept any (rotation).

    `encrypt`: the mesh's traffic is AES-GCM encrypted, not only authenticated.
    """

    def __init__(self, keys: Sequence[bytes], encrypt: bool = False) -> None:
        if not keys:
            raise UserError("the mesh secret has no keys")
        unique: list[bytes] = []
        for key in keys:
            if len(key) != SECRET_BYTES:
                raise UserError(f"a mesh key is {SECRET_BYTES} bytes, got {len(key)}")
            if key not in unique:
                unique.append(key)
        self.keys: tuple[bytes, ...] = tuple(unique)
        self._by_id = {key_id(k): k for k in reversed(self.keys)}  # on a clash the first key wins
        self.primary_id = key_id(self.keys[0])
        self.encrypt = bool(encrypt)

    @property
    def primary(self) -> bytes:
        return self.keys[0]

    def lookup(self, kid: bytes) -> bytes | None:
        """The key named `kid`, or None when this mesh does not know it."""
        return self._by_id.get(bytes(kid))

    def with_encrypt(self, encrypt: bool) -> Keyring:
        """The same keys with encryption on or off."""
        return Keyring(self.keys, encrypt=encrypt)

    def text_items(self) -> list[str]:
        """The keys (and the word `encrypt` when set): the lines of a file, the items of the variable."""
        return [encode_key(k) for k in self.keys] + ([ENCRYPT_WORD] if self.encrypt else [])

    def to_text(self) -> str:
        """The form MESHTRAIN_SECRET takes (comma-separated keys): how a worker inherits the keyring."""
        return ",".join(self.text_items())

    @classmethod
    def from_text(cls, text: str, where: str) -> Keyring:
        items = (p.strip() for p in text.replace("\n", ",").split(","))
        parts = [p for p in items if p and not p.startswith("#")]
        encrypt = ENCRYPT_WORD in parts
        keys = [p for p in parts if p != ENCRYPT_WORD]
        if not keys:
            raise UserError(f"{where}: no mesh key found")
        return cls([decode_key(p, where) for p in keys], encrypt=encrypt)

    def __repr__(self) -> str:  # never print key material
        mode = ", encrypted" if self.encrypt else ""
        return f"Keyring({len(self.keys)} keys, primary id {self.primary_id.hex()}{mode})"


def default_secret_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get(ENV_HOME):
        return Path(env[ENV_HOME]) / "secret"
    base = Path(env["XDG_CONFIG_HOME"]) if env.get("XDG_CONFIG_HOME") else Path.home() / ".config"
    return base / "meshtrain" / "secret"


def write_secret_file(path: Path, keyring: Keyring) -> None:
    """Write the keyring readable by its owner only (created 0600, never world-readable even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, ("\n".join(keyring.text_items()) + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_secret_file(path: Path) -> Keyring:
    try:
        mode = path.stat().st_mode
        text = path.read_text("ascii")
    except FileNotFoundError:
        raise UserError(f"secret file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read secret file {path}: {exc.__class__.__name__}") from None
    if mode & 0o077:
        raise UserError(f"secret file {path} is readable by others; run: chmod 600 {path}")
    return Keyring.from_text(text, str(path))


def load_keyring(
    secret_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    create: bool = True,
) -> tuple[Keyring, bool]:
    """(keyring, created): the mesh secret from the first source that has one.

    `created` is True when this call made a new secret (the first `join`,
    which then prints the join command).
    """
    env = os.environ if env is None else env
    if secret_file is not None:
        return read_secret_file(Path(secret_file)), False
    if env.get(ENV_SECRET):
        return Keyring.from_text(env[ENV_SECRET], ENV_SECRET), False
    path = default_secret_path(env)
    if path.exists():
        return read_secret_file(path), False
    if not create:
        raise UserError("no mesh secret: run `meshtrain join` once, or pass --secret-file or --token")
    keyring = Keyring([generate_secret()])
    write_secret_file(path, keyring)
    return keyring, True


def store_joined_secret(
    keyring: Keyring, key: bytes, env: Mapping[str, str] | None = None, encrypt: bool | None = None
) -> Keyring:
    """Make `key` (from a join token) this machine's primary key, keeping older ones for rotation.

    The encryption setting is the joined mesh's: `encrypt` when given, else the keyring's.
    """
    merged = Keyring([key, *keyring.keys], encrypt=keyring.encrypt if encrypt is None else encrypt)
    write_secret_file(default_secret_path(env), merged)
    return merged


# --- join tokens -------------------------------------------------------------------


@dataclass(frozen=True)
class JoinToken:
    secret: bytes
    seed: str | None = None  # "host:port" of a node to contact first (optional: LAN discovery finds one)
    encrypt: bool = False  # the mesh encrypts its traffic: the joiner must too


def make_token(secret: bytes, seed: str | None = None, encrypt: bool = False) -> str:
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a mesh secret is {SECRET_BYTES} bytes")
    seed_bytes = (seed or "").encode("utf-8")
    if len(seed_bytes) > _MAX_SEED:
        raise ValueError("seed address too long")
    head = bytes([_TOKEN_VERSION_FLAGS, _FLAG_ENCRYPT]) if encrypt else bytes([_TOKEN_VERSION])
    body = head + secret + seed_bytes
    return TOKEN_PREFIX + _b64(body + hashlib.sha256(body).digest()[:_CHECKSUM_BYTES])


def parse_token(text: str) -> JoinToken:
    """The secret and seed of a join token; any damage is a one-line UserError."""
    text = text.strip()
    if not text.startswith(TOKEN_PREFIX):
        raise UserError(f"not a meshtrain join token (it should start with {TOKEN_PREFIX!r})")
    try:
        raw = _unb64(text[len(TOKEN_PREFIX) :])
    except (ValueError, binascii.Error):
        raise UserError("the join token is damaged (not base64url); copy it again") from None
    shortest = 1 + SECRET_BYTES + _CHECKSUM_BYTES
    if not shortest <= len(raw) <= shortest + 1 + _MAX_SEED:
        raise UserError("the join token is damaged (wrong length); copy it again")
    body, checksum = raw[:-_CHECKSUM_BYTES], raw[-_CHECKSUM_BYTES:]
    if not hmac.compare_digest(hashlib.sha256(body).digest()[:_CHECKSUM_BYTES], checksum):
        raise UserError("the join token is damaged (checksum mismatch); copy it again")
    if body[0] == _TOKEN_VERSION:
        flags, start = 0, 1
    elif body[0] == _TOKEN_VERSION_FLAGS and len(body) >= 2 + SECRET_BYTES and body[1] <= _FLAG_ENCRYPT:
        flags, start = body[1], 2
    else:
        raise UserError(f"join token version {body[0]} is not supported by this meshtrain")
    seed_bytes = body[start + SECRET_BYTES :]
    if len(seed_bytes) > _MAX_SEED:
        raise UserError("the join token is damaged (wrong length); copy it again")
    try:
        seed = seed_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError("the join token is damaged (bad seed address); copy it again") from None
    return JoinToken(
        secret=body[start : start + SECRET_BYTES], seed=seed or None, encrypt=bool(flags & _FLAG_ENCRYPT)
    )


def join_command(keyring: Keyring, seed: str | None = None) -> str:
    """The exact command another machine runs to join this mesh."""
    return f"meshtrain join --token {make_token(keyring.primary, seed, encrypt=keyring.encrypt)}"
