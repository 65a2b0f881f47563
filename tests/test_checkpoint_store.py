"""The checkpoint store on a real filesystem, transfers over real loopback TCP, the CLI handlers."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest

from meshtrain import wire
from meshtrain.checkpoints import transfer
from meshtrain.checkpoints.arrays import flatten_tree, restore_rng, rng_state, unflatten_tree
from meshtrain.checkpoints.store import (
    MANIFEST,
    PARAMS,
    CheckpointStore,
    checkpoints_root,
    parse_target,
)
from meshtrain.cli.checkpoints import add_parser, checkpoints_command, export_command
from meshtrain.errors import UserError, WireError


def tiny_params(seed: int = 0) -> dict[str, Any]:
    mx.random.seed(seed)
    return {"layers": [{"w": mx.random.normal((4, 3)), "b": mx.zeros((3,))}], "scale": mx.array(2.0)}


def same_bits(a: mx.array, b: mx.array) -> bool:
    x, y = np.array(a), np.array(b)
    return x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    return CheckpointStore(tmp_path / "a")


# ------------------------------------------------------------------ layout, listing, atomicity


def test_root_follows_meshtrain_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHTRAIN_HOME", str(tmp_path))
    assert checkpoints_root() == tmp_path / "checkpoints"
    assert CheckpointStore().root == tmp_path / "checkpoints"


def test_save_list_load_round_trip(store: CheckpointStore) -> None:
    params = tiny_params()
    info = store.save(
        "mnist",
        100,
        params,
        {"step": mx.array(100, dtype=mx.uint64), "m": [mx.ones((2,))]},
        cursor={"epoch": 1, "index": 640},
        hyperparameters={"lr": 0.01, "batch": 64},
        generation=3,
        metrics={"loss": 0.25, "test_accuracy": 0.97},
        manifest={"replicas": ["n1", "n2"], "term": 4},
    )
    assert (info.step, info.loss, info.accuracy, info.replicas, info.term) == (
        100,
        0.25,
        0.97,
        ["n1", "n2"],
        4,
    )
    assert info.bytes == sum(
        p.stat().st_size for p in info.path.iterdir() if p.name != MANIFEST and p.name != "part.json"
    )
    assert store.runs() == ["mnist"] and [i.step for i in store.checkpoints("mnist")] == [100]
    loaded = store.load("mnist", verify=True)
    assert loaded.step == 100 and loaded.state["cursor"] == {"epoch": 1, "index": 640}
    assert loaded.state["generation"] == 3 and loaded.state["hyperparameters"]["lr"] == 0.01
    tree = loaded.params_tree()
    assert same_bits(tree["layers"][0]["w"], params["layers"][0]["w"]) and same_bits(
        tree["scale"], params["scale"]
    )
    assert loaded.optimizer["step"].dtype == mx.uint64 and same_bits(loaded.optimizer["m.0"], mx.ones((2,)))
    assert not any(p.name.startswith(".tmp-") for p in info.path.iterdir())


def test_a_part_without_manifest_is_not_a_checkpoint(store: CheckpointStore) -> None:
    store.save("r", 10, tiny_params())
    store.write_part("r", 20, tiny_params(1))
    assert [i.step for i in store.checkpoints("r")] == [10]
    assert store.latest("r").step == 10  # type: ignore[union-attr]
    assert store.load("r").step == 10
    (store.step_dir("r", 20) / ".tmp-99-params.safetensors").write_bytes(b"being written")
    incoming = store.incoming_dir("r", 30)
    assert store.clean("r", keep_steps=[20], incoming=False) == []  # in flight, and a transfer running
    assert incoming.exists() and (store.step_dir("r", 20) / ".tmp-99-params.safetensors").exists()
    assert store.clean("r", keep_steps=[20]) == [incoming]
    removed = store.clean("r")
    assert removed == [store.step_dir("r", 20)] and not removed[0].exists()
    assert store.step_dir("r", 10).exists()


def test_crash_between_parts_and_manifest_leaves_nothing_listed(tmp_path: Path) -> None:
    """A real process dies (os._exit) after writing its part, before the manifest."""
    root = tmp_path / "crash"
    script = textwrap.dedent(
        f"""
        import os, mlx.core as mx
        from meshtrain.checkpoints.store import CheckpointStore
        s = CheckpointStore({str(root)!r})
        s.save("run", 1, {{"w": mx.ones((8,))}})
        s.write_part("run", 2, {{"w": mx.zeros((8,))}})
        os._exit(9)
        s.commit("run", 2)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == 9, proc.stderr.decode()
    store = CheckpointStore(root)
    assert (root / "run" / "2" / PARAMS).exists()  # the part is on disk...
    assert [i.step for i in store.checkpoints("run")] == [1]  # ...but does not count
    assert store.load("run").step == 1
    store.clean()
    assert not (root / "run" / "2").exists()


def test_torn_and_temporary_files_are_ignored_and_cleaned(store: CheckpointStore) -> None:
    good = store.save("r", 1, tiny_params())
    torn = store.save("r", 2, tiny_params(2))
    with open(torn.path / PARAMS, "r+b") as f:  # a file cut short after the manifest was written
        f.truncate(10)
    (good.path / ".tmp-1234-params.safetensors").write_bytes(b"half a file")  # a write that never renamed
    bad_manifest = store.save("r", 3, tiny_params(3))
    (bad_manifest.path / MANIFEST).write_text("{ not json")
    assert [i.step for i in store.checkpoints("r")] == [1]
    with pytest.raises(UserError, match="no complete checkpoint at step 2"):
        store.load("r", 2)
    removed = store.clean()
    assert torn.path in removed and bad_manifest.path in removed
    assert not (good.path / ".tmp-1234-params.safetensors").exists()
    assert store.load("r").step == 1


def test_verify_catches_flipped_bytes(store: CheckpointStore) -> None:
    info = store.save("r", 1, {"w": mx.ones((64,))})
    data = bytearray((info.path / PARAMS).read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    (info.path / PARAMS).write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupt"):
        store.load("r", verify=True)


def test_prune_keeps_the_newest(store: CheckpointStore) -> None:
    for step in (5, 10, 15, 20):
        store.save("r", step, {"w": mx.full((4,), step)})
    assert store.prune("r", 2) == [5, 10]
    assert [i.step for i in store.checkpoints("r")] == [15, 20]
    assert not store.step_dir("r", 5).exists()
    with pytest.raises(UserError):
        store.prune("r", 0)


def test_user_errors_are_one_liners(store: CheckpointStore) -> None:
    for bad in ("", "../etc", ".hidden", "a/b"):
        with pytest.raises(UserError):
            store.run_dir(bad)
    with pytest.raises(UserError, match="no complete checkpoint of run 'nope'"):
        store.load("nope")
    with pytest.raises(UserError, match="RUN@STEP"):
        parse_target("r@x")
    assert parse_target("r") == ("r", None) and parse_target("r@12") == ("r", 12)
    store.save("r", 1, {"w": mx.ones((2,))})
    with pytest.raises(UserError, match="already committed"):
        store.write_part("r", 1, {"w": mx.ones((2,))})


# ------------------------------------------------------------------ resume is exact


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = [nn.Linear(8, 16), nn.Linear(16, 4)]
        self.drop = nn.Dropout(0.25)

    def __call__(self, x: mx.array) -> mx.array:
        return self.layers[1](self.drop(nn.relu(self.layers[0](x))))


STEPS = 8


def train(model: Net, opt: optim.Optimizer, start: int, stop: int) -> None:
    def loss_fn(m: Net, x: mx.array, y: mx.array) -> mx.array:
        return nn.losses.cross_entropy(m(x), y).mean()

    step_fn = nn.value_and_grad(model, loss_fn)
    data = np.random.default_rng(7)
    xs = data.normal(size=(STEPS, 32, 8)).astype(np.float32)  # the "sampler": batch i is fixed by i
    ys = data.integers(0, 4, size=(STEPS, 32))
    for i in range(start, stop):
        _, grads = step_fn(model, mx.array(xs[i]), mx.array(ys[i]))
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)


def test_resume_gives_bitwise_equal_params(store: CheckpointStore) -> None:
    mx.random.seed(11)
    straight, opt = Net(), optim.Adam(learning_rate=1e-2)
    train(straight, opt, 0, STEPS)

    mx.random.seed(11)
    first, opt1 = Net(), optim.Adam(learning_rate=1e-2)
    train(first, opt1, 0, 4)
    store.save("exact", 4, first.parameters(), opt1.state, cursor=4, rng=rng_state())

    mx.random.seed(999)  # a fresh process would have other weights and another RNG state
    resumed, opt2 = Net(), optim.Adam(learning_rate=1e-2)
    ck = store.load("exact")
    resumed.update(ck.params_tree())
    opt2.state = ck.optimizer_tree()
    restore_rng(ck.state["rng"])
    train(resumed, opt2, int(ck.state["cursor"]), STEPS)

    flat_a, flat_b = flatten_tree(straight.parameters()), flatten_tree(resumed.parameters())
    assert flat_a.keys() == flat_b.keys()
    assert all(same_bits(flat_a[k], flat_b[k]) for k in flat_a)
    assert int(opt2.state["step"]) == 8


# ------------------------------------------------------------------ export and the CLI handlers


def test_export_writes_one_safetensors_file(store: CheckpointStore, tmp_path: Path) -> None:
    params = tiny_params()
    store.save("r", 3, params)
    store.save("r", 7, tiny_params(5))
    info, path = store.export("r", 3, tmp_path / "model")
    assert path == tmp_path / "model.safetensors" and info.step == 3
    loaded: Any = mx.load(str(path), return_metadata=True)
    arrays, meta = loaded
    assert meta["step"] == "3" and meta["run"] == "r"
    assert same_bits(unflatten_tree(arrays)["layers"][0]["w"], params["layers"][0]["w"])
    with pytest.raises(UserError, match="no such directory"):
        store.export("r", None, tmp_path / "missing" / "m.safetensors")


def test_cli_handlers(store: CheckpointStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    for step in (10, 20, 30):
        store.save("mnist", step, {"w": mx.ones((3,))}, metrics={"loss": 1.0 / step, "test_accuracy": 0.9})
    store.write_part("mnist", 40, {"w": mx.ones((3,))})  # uncommitted: never listed
    args = parser.parse_args(["checkpoints"])
    assert args.handler(args, store) == 0
    out = capsys.readouterr().out
    assert "mnist" in out and "30" in out
    args = parser.parse_args(["checkpoints", "mnist", "--keep", "2", "--json"])
    assert checkpoints_command(args, store) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [c["step"] for c in listing["checkpoints"]] == [20, 30] and listing["pruned"] == [10]
    args = parser.parse_args(["checkpoints", "mnist"])
    assert checkpoints_command(args, store) == 0
    out = capsys.readouterr().out
    assert "0.05" in out and "90.00%" in out
    assert not re.search(r"│\s*40\s*│", out), out  # the uncommitted step (a clock may read 09:40)
    args = parser.parse_args(["export", "mnist@20", str(tmp_path / "out")])
    assert export_command(args, store) == 0
    assert "step 20" in capsys.readouterr().out and (tmp_path / "out.safetensors").exists()
    with pytest.raises(UserError, match="no complete checkpoint at step 40"):
        export_command(parser.parse_args(["export", "mnist@40", str(tmp_path / "x")]), store)
    with pytest.raises(UserError, match="--keep needs a RUN"):
        checkpoints_command(parser.parse_args(["checkpoints", "--keep", "1"]), store)


# ------------------------------------------------------------------ replicate / fetch over loopback TCP


@pytest.mark.parametrize("encrypt", [False, True])
def test_fetch_and_replicate_over_loopback(tmp_path: Path, encrypt: bool) -> None:
    """Over the per-connection authenticated channel (sealed in an --encrypt mesh); a node with
    another mesh's secret is refused at the handshake, before any checkpoint byte moves."""
    from meshtrain.security.secret import Keyring

    a, b, c = (CheckpointStore(tmp_path / n) for n in "abc")
    big = {"w": mx.random.normal((700_000,))}  # ~2.8 MB: several 1 MiB frames
    a.save("r", 5, {"w": mx.ones((3,))})
    a.save("r", 9, big, metrics={"loss": 0.5}, manifest={"replicas": ["a"]})
    key = Keyring([bytes(range(32))], encrypt=encrypt)
    stranger = Keyring([bytes(32)], encrypt=encrypt)

    async def scenario() -> None:
        server_a = transfer.CheckpointServer(a, keyring=key)
        server_c = transfer.CheckpointServer(c, keyring=key)
        port_a, port_c = await server_a.start(), await server_c.start()
        try:
            assert await transfer.list_remote("127.0.0.1", port_a, "r", keyring=key) == [5, 9]
            got = await transfer.fetch_checkpoint("127.0.0.1", port_a, "r", None, store=b, keyring=key)
            assert got.step == 9 and got.path.parent.parent == b.root
            await transfer.replicate_checkpoint("127.0.0.1", port_c, "r", 9, store=a, keyring=key)
            with pytest.raises(transfer.TransferError, match="no complete checkpoint at step 7"):
                await transfer.fetch_checkpoint("127.0.0.1", port_a, "r", 7, store=b, keyring=key)
            with pytest.raises(WireError, match="authentication failed"):  # another mesh's secret
                await transfer.list_remote("127.0.0.1", port_a, "r", keyring=stranger)
            with pytest.raises((WireError, ConnectionError, asyncio.IncompleteReadError)):  # no secret
                await transfer.list_remote("127.0.0.1", port_a, "r")
        finally:
            await server_a.close()
            await server_c.close()

    asyncio.run(scenario())
    for s in (b, c):
        ck = s.load("r", verify=True)
        assert ck.step == 9 and same_bits(ck.params["w"], big["w"]) and ck.info.loss == 0.5
        assert not [p for p in s.run_dir("r").iterdir() if p.name.startswith(".")]


def test_interrupted_transfer_leaves_nothing_and_resume_finds_a_replica(tmp_path: Path) -> None:
    """A sender that dies mid-file: nothing listed at the receiver; fetch_newest then uses another peer."""
    a, b, d = (CheckpointStore(tmp_path / n) for n in "abd")
    a.save("r", 3, {"w": mx.ones((3,))})
    info = a.save("r", 8, {"w": mx.random.normal((600_000,))})

    async def truncating_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request, _ = await wire.read_frame(reader)
        if request["kind"] == "ckpt.list":  # it claims to have step 8...
            await wire.write_frame(writer, {"kind": "ckpt.ok", "steps": [8]})
            writer.close()
            return
        files = transfer._file_list(info)
        await wire.write_frame(writer, {"kind": "ckpt.offer", "run": "r", "step": 8, "files": files})
        data = (info.path / PARAMS).read_bytes()[: transfer.CHUNK_BYTES]
        await wire.write_frame(writer, {"kind": "ckpt.data", "name": PARAMS, "offset": 0}, data)
        writer.close()  # dies mid-checkpoint

    async def scenario() -> None:
        broken = await asyncio.start_server(truncating_server, "127.0.0.1", 0)
        broken_port = broken.sockets[0].getsockname()[1]
        with pytest.raises(WireError):
            await transfer.fetch_checkpoint("127.0.0.1", broken_port, "r", 8, store=b)
        assert b.checkpoints("r") == []
        assert not [p for p in b.run_dir("r").iterdir()]  # the .incoming dir is gone too
        server = transfer.CheckpointServer(a)
        port = await server.start()
        peers = [("127.0.0.1", broken_port), ("127.0.0.1", port)]
        try:
            got = await transfer.fetch_newest(peers, "r", store=b)  # ...but fails it: the replica serves
            assert got is not None and got.step == 8
            broken.close()
            # the first peer no longer listens (a node that lost its checkpoints); the second has a replica
            got = await transfer.fetch_newest(peers, "r", store=d)
            assert got is not None and got.step == 8
            d.save("r", 12, {"w": mx.ones((1,))})  # newer locally: nothing is fetched
            again = await transfer.fetch_newest([("127.0.0.1", port)], "r", store=d)
            assert again is not None and again.step == 12
        finally:
            await server.close()

    asyncio.run(scenario())
    assert [i.step for i in d.checkpoints("r")] == [8, 12] and [i.step for i in b.checkpoints("r")] == [8]


def test_transfer_rejects_path_tricks() -> None:
    with pytest.raises(transfer.TransferError):
        transfer._check_files({"../../etc/passwd": 3, MANIFEST: 1})
    with pytest.raises(transfer.TransferError):
        transfer._check_files({"params.safetensors": 3})
