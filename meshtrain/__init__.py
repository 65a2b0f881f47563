"""meshtrain: data-parallel MLX training across the machines you already own.

A training script stays a plain MLX loop with a few lines added (README's
"Writing a training script" is the contract; examples/mnist.py the full version)::

    import meshtrain
    mesh = meshtrain.init()                    # rank, size; world size 1 when run plainly
    mesh.register(model, optimizer)            # replicas made identical; what joiners receive
    for epoch in range(epochs):
        for idx in mesh.batches(len(X), batch_size, epoch=epoch):   # this worker's slice
            loss, grads = loss_and_grad(model, mx.array(X[idx]), mx.array(Y[idx]))
            grads = mesh.allreduce(grads, weight=len(idx))          # exact weighted mean
            optimizer.update(model, grads)
            mesh.report(epoch=epoch, epochs=epochs, loss=loss, samples=len(idx))
        sums = mesh.evaluate(len(X_test), count_correct)           # spread over the workers
        mesh.report(epoch=epoch, epochs=epochs, test_accuracy=sums["correct"] / len(X_test))
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
