"""Errors meshtrain raises.

`UserError` is the one a person caused (bad flag, missing file, wrong secret,
unreachable peer): the CLI prints its message as one line and exits non-zero,
never a traceback. The others are protocol failures the code recovers from.
"""

from __future__ import annotations


class MeshtrainError(Exception):
    """Base class of every error meshtrain raises on purpose."""


class UserError(MeshtrainError):
    """A mistake the user can fix; its message is the whole explanation."""


class WireError(MeshtrainError):
    """A frame or datagram that is malformed, oversized, truncated or of unknown kind."""


class PeerLost(MeshtrainError):
    """A ring neighbour closed, reset or stalled; the ring generation is over.

    Raised on every surviving member so the elastic layer can form generation g+1.
    """

    def __init__(self, peer: str, generation: int, reason: str = "") -> None:
        self.peer = peer
        self.generation = generation
        self.reason = reason
        detail = f": {reason}" if reason else ""
        super().__init__(f"lost ring peer {peer} in generation {generation}{detail}")
