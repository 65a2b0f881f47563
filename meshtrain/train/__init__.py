"""Elastic data-parallel training: the pure parts the worker's `WorkerMesh` is built from.

    stepper.py         Stepper: a worker's step bookkeeping (global step, hand-out, commits, recovery
                       actions, shares) as a pure state machine; WorkerMesh is its shell
    step_sampler.py    StepSampler: permutation per (seed, epoch) + global cursor + carried slices
                       (every index of an epoch in exactly one committed reduction); the debug ledger check
    recovery.py        what the members of a new ring generation do: take, redo, pin, send state (pure)
    digest.py          state_digest(tree, step): blake2b of params + optimizer state
    leaves.py          state as leaves by path, written back into the receiver's own trees
    ring_broadcast.py  exact broadcasts (bytes, MLX trees) over the ring's all-reduce
    shares.py          batch shares from measured speed, power state and free memory
    local_sgd.py       OuterOptimizer: H local steps, then an outer Nesterov step (DiLoCo style)
    outer_recovery.py  what local SGD's members do at a sync after a loss or a join (pure)
    compression.py     int8 outer deltas on an agreed grid, with error feedback
    accumulate.py      K micro-batches per step (mesh.batches(..., accumulate=K)), Accumulation

The shell that drives them is meshtrain/worker/mesh.py (local SGD's: meshtrain/worker/local_rounds.py).
"""
