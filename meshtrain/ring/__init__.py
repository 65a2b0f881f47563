"""The data plane: a pipelined TCP ring all-reduce of fused MLX gradients.

    listener = RingListener.bind()                       # publish listener.port to the others
    ring = Ring.connect(listener, rank=r, addrs=[(host, port), ...], job="j", generation=g)
    grads = ring.allreduce_tree(grads, step=s, weight=batch_size, wire_dtype="bfloat16")

Pass ``keyring=`` (meshtrain.security.Keyring, the mesh secret) to `Ring.connect`
to authenticate the neighbours and tag every frame (HMAC-SHA256, per-connection key).

schedule.py and reduction.py are pure (no I/O); tcp.py and ring.py are the
asyncio shell; tensors.py fuses trees and casts for the wire.
"""

from meshtrain.ring.ring import DEFAULT_CHUNK_BYTES, Ring
from meshtrain.ring.schedule import RingSchedule, Transfer
from meshtrain.ring.tcp import RingListener, RingPeerLost

__all__ = ["DEFAULT_CHUNK_BYTES", "Ring", "RingListener", "RingPeerLost", "RingSchedule", "Transfer"]
