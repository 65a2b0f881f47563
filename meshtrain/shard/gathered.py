"""Stage 3 on the worker: each named layer runs on parameters gathered for it, forward and backward.

`GatheredLayers.install` gives every layer the stage names (``layers=model.layers``) a subclass whose
`__call__` wraps the original in an `mx.custom_function`:

- forward: all-gather the layer's parameters (each member contributes the whole arrays it owns,
  meshtrain.shard.units), run the layer on them, evaluate its output, drop the gathered arrays;
- backward (the custom VJP, which MLX calls layer by layer from the last one): gather again,
  recompute the layer, take its VJP, and reduce-scatter the parameters' gradient at once, so the
  owner of each array receives the mesh's weighted mean for it and nobody keeps the whole gradient.

Why the layer's inputs are copied before it runs: inside `nn.value_and_grad` they are tracers, and
MLX keeps an evaluated tracer's whole graph (the gathered parameters in it) until the backward. A
copy starts a graph of its own; its evaluated output is detached, so one layer's gathered
parameters are alive at a time (plus its recomputation in the backward). The price is the
recomputation: one more forward per layer, the same trade as activation checkpointing.

The parameters of layers a member does not own are zero-sized placeholders in its model, and
their gradients come back zero-sized; owned ones get the reduced gradient as their own cotangent,
so `opt.update(model, grads)` reads a plain gradient tree.

Prefetch: the collectives run on one thread of their own, in the order they are issued (the same
on every member: the same program). The first step records the order the layers are called in;
from then on, a layer's forward starts the next one's gather before it computes, and a layer's
backward the previous one's, so the ring moves the next layer while MLX computes this one. At most
one gather is ahead, and the optimizer waits for it before any collective of its own, so nothing
else shares the ring meanwhile. A layer called out of the recorded order just waits for the
prefetched gather and issues its own (every member alike); the schedule is the first step's calls
up to the first layer called again (an evaluation pass before training, a layer used twice).

Dropout: a layer holding a Dropout module is run with the same seed in its forward and its
recomputation (per step, call and rank), so both see the same mask.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, cast

import numpy as np

from meshtrain.errors import PeerLost, UserError
from meshtrain.ring.tensors import flatten_tree
from meshtrain.shard.units import owned_run, piece_sizes

_RANDOM_MODULES = ("Dropout", "Dropout2d", "Dropout3d")
WAIT_WARN_S = 30.0  # a layer's gather or reduction waited this long: say why it may be stuck


class GatheredLayers:
    """The stage-3 layers of one ShardedOptimizer: their gathers and reductions over its mesh."""

    def __init__(self, opt: Any, *, prefetch: bool = True) -> None:
        self.opt = opt
        self.prefetch = prefetch
        self.calls = 0  # layer calls this step (seeds the dropout of each)
        self.gathers = 0
        self.prefetched = 0  # gathers that were already under way when their layer asked
        self.layers: list[Any] = []
        self._order: list[int] = []  # the first step's forward order of the units
        self._next: dict[int, int] | None = None  # recorded: unit -> the next one called forward
        self._prev: dict[int, int] = {}
        self._comm: ThreadPoolExecutor | None = None
        self._ahead: tuple[int, Future[np.ndarray]] | None = None  # (unit, its gather under way)
        self._queued: list[Future[Any]] = []

    # --- setting up ---------------------------------------------------------------------------
    def install(self, layers: Sequence[Any], prefixes: Sequence[str]) -> None:
        opt = self.opt
        self.layers = list(layers)
        for u, (layer, prefix) in enumerate(zip(layers, prefixes, strict=True)):
            names = [opt._paths[i][len(prefix) + 1 :] for i in opt.units.layers[u]]
            _patch(layer, self, u, names)

    def step_done(self) -> None:
        """After an update: the first step's order becomes the prefetch schedule."""
        self.calls = 0
        if self._next is None and self._order:
            self._next = schedule(self._order)
            self._prev = {b: a for a, b in self._next.items()}

    # --- the collectives ----------------------------------------------------------------------
    def _sizes(self, u: int) -> list[int]:
        opt = self.opt
        return piece_sizes(opt.units.layers[u], opt._elems, opt.plan.leaf_ranges)

    def _submit(self, fn: Callable[[], Any]) -> Future[Any]:
        if self._comm is None:
            self._comm = ThreadPoolExecutor(1, thread_name_prefix="meshtrain-stage3")
        future = self._comm.submit(fn)
        self._queued = [f for f in self._queued if not f.done()] + [future]
        return future

    def drain(self) -> None:
        """Wait for every collective under way (before one the caller issues on this thread)."""
        self._ahead = None
        queued, self._queued = self._queued, []
        for future in queued:
            future.exception()  # finished either way; its own waiter reports a failure

    def _result(self, future: Future[Any], what: str = "collective") -> Any:
        """The collective's result; a line on stderr each WAIT_WARN_S it is still waited for (the
        other workers alive but not calling the model: a main-only evaluation would hang quietly)."""
        waited = 0.0
        try:
            while True:
                try:
                    return future.result(timeout=WAIT_WARN_S)
                except FutureTimeout:
                    waited += WAIT_WARN_S
                    print(
                        f"meshtrain: stage 3 has waited {waited:.0f}s for the other workers in a layer's "
                        f"{what}: every worker must call the model the same number of times (evaluate "
                        "with mesh.evaluate on every worker, not on the main one only)",
                        file=sys.stderr,
                        flush=True,
                    )
        except PeerLost as exc:
            self.drain()
            raise self.opt._lost(self.opt.plan, exc) from None

    def _my_piece(self, u: int, leaves: Sequence[Any] | None = None) -> np.ndarray:
        """This member's owned arrays of unit `u`, float32 and flat (read on the calling thread)."""

        opt = self.opt
        unit = opt.units.layers[u]
        start, stop = owned_run(unit, opt.plan.leaf_ranges[opt.mesh.rank])
        if leaves is None:
            from mlx.utils import tree_flatten

            leaves = [
                v for _, v in cast(list[tuple[str, Any]], tree_flatten(self.layers[u].trainable_parameters()))
            ]
        return flatten_tree([leaves[pos] for pos in range(start, stop)])[0]

    def _start_gather(self, u: int, piece: np.ndarray) -> Future[np.ndarray]:
        opt = self.opt
        sizes = self._sizes(u)
        lo = sum(sizes[: opt.mesh.rank])

        def run() -> np.ndarray:
            whole = np.empty(sum(sizes), np.float32)
            whole[lo : lo + piece.size] = piece
            opt.mesh.all_gather(whole[lo : lo + piece.size], sizes, wire_dtype="float32", out=whole)
            return whole

        opt._check_members(opt.plan)
        return self._submit(run)

    def gather(self, u: int, leaves: Sequence[Any], *, then: int | None = None) -> list[Any]:
        """Layer `u`'s parameters, whole, in its leaf order (each member gives the arrays it owns);
        with `then`, that layer's gather is started behind it (prefetch)."""

        opt = self.opt
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == u:
            future = ahead[1]
            self.prefetched += 1
        else:
            future = self._start_gather(u, self._my_piece(u, leaves))
        if then is not None and self.prefetch:
            self._ahead = (then, self._start_gather(then, self._my_piece(then)))
        whole = self._result(future, "gather")
        self.gathers += 1
        return cast(list[Any], opt.arrays(whole, opt.units.layers[u]))

    def reduce(self, u: int, grads: Sequence[Any]) -> list[Any]:
        """Reduce-scatter layer `u`'s whole gradient: this member's owned arrays of the weighted mean;
        a zero-sized array for each one it does not own (its placeholder's cotangent)."""
        import mlx.core as mx

        from meshtrain.ring.codecs import resolve as resolve_wire_dtype

        opt = self.opt
        unit = opt.units.layers[u]
        sizes = self._sizes(u)
        buf, _ = flatten_tree(list(grads))
        wire = resolve_wire_dtype(list(grads), opt.wire_dtype)
        weight = opt._step_weight()
        opt._check_members(opt.plan)
        future = self._submit(
            lambda: opt.mesh.reduce_scatter(buf, sizes, weight=weight, wire_dtype=wire, overwrite=True)
        )
        piece = self._result(future, "gradient reduction")
        start, stop = owned_run(unit, opt.plan.leaf_ranges[opt.mesh.rank])
        mine = opt.arrays(piece, unit[start:stop])
        return (
            [mx.zeros((0,), opt._dtypes[leaf]) for leaf in unit[:start]]
            + mine
            + [mx.zeros((0,), opt._dtypes[leaf]) for leaf in unit[stop:]]
        )

    # --- one layer call -----------------------------------------------------------------------
    def call(
        self,
        u: int,
        layer: Any,
        names: list[str],
        base: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        import mlx.core as mx
        from mlx.utils import tree_flatten, tree_unflatten

        flat = dict(tree_flatten(layer.trainable_parameters()))
        leaves = [flat[n] for n in names]
        positions = [i for i, a in enumerate(args) if isinstance(a, mx.array)]
        keys = sorted(k for k, v in kwargs.items() if isinstance(v, mx.array))
        inputs = [args[i] for i in positions] + [kwargs[k] for k in keys]
        seed = self._seed(layer)

        def run(params: Sequence[Any], ins: Sequence[Any]) -> Any:
            call_args = list(args)
            for i, a in zip(positions, ins[: len(positions)], strict=True):
                call_args[i] = a
            call_kwargs = {**kwargs, **dict(zip(keys, ins[len(positions) :], strict=True))}
            held = list(flat.items())
            layer.update(tree_unflatten(list(zip(names, params, strict=True))), strict=False)
            try:
                if seed is not None:
                    mx.random.seed(seed)
                return base(layer, *call_args, **call_kwargs)
            finally:
                layer.update(tree_unflatten(held), strict=False)

        if self._next is None:
            self._order.append(u)

        def forward(leaves: list[Any], ins: list[Any]) -> Any:
            after = self._next.get(u) if self._next else None
            out = run(self.gather(u, leaves, then=after), [_detached(a) for a in ins])
            _check_output(out, layer)
            mx.eval(out)
            return out

        def backward(primals: Any, cotangents: Any, _outputs: Any) -> Any:
            leaves, ins = primals
            params = self.gather(u, leaves, then=self._prev.get(u))
            fresh = [_detached(a) for a in ins]
            n = len(params)
            cots = list(cotangents) if isinstance(cotangents, (tuple, list)) else [cotangents]

            def whole(*xs: Any) -> Any:
                out = run(xs[:n], xs[n:])
                return list(out) if isinstance(out, (tuple, list)) else [out]

            _, grads = mx.vjp(whole, [*params, *fresh], cots)
            mx.eval(grads)
            del params
            leaf_cots = self.reduce(u, grads[:n])
            in_cots = [_detached(g) for g in grads[n:]]
            return leaf_cots, in_cots

        fn = mx.custom_function(forward)
        fn.vjp(backward)
        return fn(leaves, inputs)

    def _seed(self, layer: Any) -> int | None:
        """A seed for a layer with dropout in training mode (the same in its forward and backward)."""
        self.calls += 1
        if not getattr(layer, "training", False):
            return None
        if not any(type(m).__name__ in _RANDOM_MODULES for m in layer.modules()):
            return None
        opt = self.opt
        return (opt._steps * 1_000_003 + self.calls * 7919 + opt.mesh.rank * 104_729) & 0x7FFFFFFF


def schedule(calls: Sequence[int]) -> dict[int, int]:
    """Unit -> the unit called after it, from the first step's calls up to the first unit called
    again (an evaluation before training, or a layer used twice, ends the pass there)."""
    seen: set[int] = set()
    order: list[int] = []
    for u in calls:
        if u in seen:
            break
        seen.add(u)
        order.append(u)
    return dict(zip(order, order[1:], strict=False))


def _check_output(out: Any, layer: Any) -> None:
    import mlx.core as mx

    items = out if isinstance(out, (tuple, list)) else [out]
    if not all(isinstance(x, mx.array) for x in items):
        raise UserError(
            f"a stage-3 layer ({type(layer).__mro__[1].__name__}) must return an array or a tuple of arrays"
        )


def _detached(a: Any) -> Any:
    """A copy of `a` with no graph behind it (see the module docstring: why inputs are copied)."""
    import mlx.core as mx

    mx.eval(a)
    if a.dtype == mx.bfloat16:
        return mx.array(np.array(a.view(mx.uint16))).view(mx.bfloat16)
    return mx.array(np.array(a))


def _patch(layer: Any, engine: GatheredLayers, u: int, names: list[str]) -> None:
    """Give `layer` a subclass of its own class whose calls go through `engine` (paths unchanged)."""
    base_cls = type(layer)
    if getattr(base_cls, "_meshtrain_stage3", False):
        base_cls = base_cls.__mro__[1]
    base = base_cls.__call__

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        return engine.call(u, self, names, base, args, kwargs)

    layer.__class__ = type(
        base_cls.__name__,
        (base_cls,),
        {"__call__": __call__, "__module__": base_cls.__module__, "_meshtrain_stage3": True},
    )
