"""Checkpoints: on disk (store.py), between nodes (transfer.py), in the
leader's agent (leading.py), on the command line (meshtrain/cli/checkpoints.py); cost.py measures
what one costs.

Import the submodules directly; this package stays free of MLX so the CLI starts fast.
"""
