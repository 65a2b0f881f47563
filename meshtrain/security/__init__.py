"""Security of a mesh: the shared secret, authenticated datagrams and frames, replay protection.

    keyring, created = load_keyring(secret_file=None)     # first use creates ~/.config/meshtrain/secret
    token = make_token(keyring.primary, seed="10.0.0.5:7946")   # what `meshtrain join --token` takes
    sealer = DatagramSealer(keyring)                      # one per sending process
    opener = DatagramOpener(keyring)                      # one per receiving socket
    wire_bytes = sealer.seal(body, now=time.time())
    body = opener.open(wire_bytes, now=time.time())       # DropReason raised on anything bad

Pure parts (keyring, token codec, datagram envelope, replay window, ring
handshake) take bytes and an injected clock; the ring's sockets use them in
meshtrain.ring.tcp and meshtrain.ring.streams.
"""

from meshtrain.security.auth import DatagramOpener, DatagramSealer, Dropped
from meshtrain.security.drops import DROP_REASONS, DropCounters
from meshtrain.security.replay import ReplayGuard, SequenceWindow
from meshtrain.security.secret import (
    ENV_HOME,
    ENV_SECRET,
    JoinToken,
    Keyring,
    default_secret_path,
    generate_secret,
    load_keyring,
    make_token,
    parse_token,
)

__all__ = [
    "DROP_REASONS",
    "ENV_HOME",
    "ENV_SECRET",
    "DatagramOpener",
    "DatagramSealer",
    "DropCounters",
    "Dropped",
    "JoinToken",
    "Keyring",
    "ReplayGuard",
    "SequenceWindow",
    "default_secret_path",
    "generate_secret",
    "load_keyring",
    "make_token",
    "parse_token",
]
