"""meshtrain: data-parallel MLX training across the machines you already own.

A training script stays a plain MLX loop with a few lines added::

    import meshtrain
    mesh = meshtrain.init()                      # rank, size; world size 1 when run plainly
    for epoch in range(epochs):
        for x, y in mesh.batches(n_samples, batch_size, epoch=epoch):  # this worker's slice
            loss, grads = loss_and_grad(model, X[x], Y[x])
            grads = mesh.allreduce(grads)        # weighted mean over the mesh
            optimizer.update(model, grads)
        mesh.report(epoch=epoch, accuracy=acc)   # shown in the live view
"""

from meshtrain.errors import MeshtrainError, PeerLost, UserError
from meshtrain.mesh import Mesh, init

__version__ = "0.1.0"
PROTOCOL_VERSION = 1

__all__ = ["Mesh", "MeshtrainError", "PeerLost", "UserError", "init", "__version__", "PROTOCOL_VERSION"]


def __getattr__(name: str) -> object:
    """`meshtrain.shard` after a plain `import meshtrain` (imported on first use; the agent never does)."""
    if name == "shard":
        import importlib

        return importlib.import_module("meshtrain.shard")
    raise AttributeError(f"module 'meshtrain' has no attribute {name!r}")
