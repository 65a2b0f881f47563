"""Checkpoints on disk (store.py), between nodes (transfer.py) and on the command line (commands.py)."""

from meshtrain.checkpoints.store import Checkpoint, CheckpointInfo, CheckpointStore, checkpoints_root

__all__ = ["Checkpoint", "CheckpointInfo", "CheckpointStore", "checkpoints_root"]
