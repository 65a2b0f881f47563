"""All-reduce bandwidth: meshtrain's ring vs MLX's ring backend vs raw TCP (vs torch gloo).

Every backend runs on the same hosts (loopback processes, or one process per
network namespace of a shaped LAN with --netns), the same float32 sizes, and
the same N; rounds are interleaved (backend A, B, C, then A, B, C again) so
drift of the shared machine hits them all alike. For each (N, size, backend)
it prints the median time of one all-reduce and the bus bandwidth
``2(N-1)/N * bytes / time`` (fp32-equivalent bytes, also for a 16-bit wire),
then the ratios of meshtrain to the others.

"raw TCP" is the link's own limit: every member streams `bytes` to its right
neighbour while receiving as much from its left, with blocking sendall /
recv_into of one big buffer, and the figure is bytes / time; a perfect ring
all-reduce reaches busbw equal to it.

    flock /tmp/meshtrain-bench.lock .venv/bin/python bench/allreduce.py
    flock /tmp/meshtrain-bench.lock .venv/bin/python bench/allreduce.py --netns --wire-dtype bfloat16

``--auth both`` adds "meshtrain-auth" (the same ring with the mesh secret:
challenge-response hello, a 16-byte GCM tag (GMAC) on every frame) interleaved with
the unauthenticated one, and prints the ratio meshtrain-auth/meshtrain.
``--encrypt both`` adds "meshtrain-enc" (the mesh secret with --encrypt:
AES-256-GCM payloads) the same way, with the ratios meshtrain-enc/meshtrain
and, with --auth too, meshtrain-enc/meshtrain-auth:

    flock /tmp/meshtrain-bench.lock .venv/bin/python bench/allreduce.py --backends meshtrain \
        --auth both --encrypt both --ns 2 --sizes 4,16
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict

import numpy as np

MiB = 1 << 20
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"


# --- workers (one process per rank) ----------------------------------------------------


def _timed(fn, iters: int, warmup: int) -> list[float]:  # type: ignore[no-untyped-def]
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def worker_meshtrain(
    rank: int,
    addrs: list[tuple[str, int]],
    sizes: list[int],
    iters: int,
    wire: str,
    auth: bool = False,
    encrypt: bool = False,
) -> dict:
    from meshtrain.ring import DEFAULT_CHUNK_BYTES, Ring, RingListener
    from meshtrain.security import load_keyring

    keyring = None
    if auth or encrypt:  # from MESHTRAIN_SECRET, set by the driver
        keyring = load_keyring(create=False)[0].with_encrypt(encrypt)

    host, port = addrs[rank]
    with RingListener.bind(host, port) as listener:
        chunk = int(os.environ.get("MESHTRAIN_CHUNK_KIB", "0")) * 1024 or DEFAULT_CHUNK_BYTES
        sockbuf = int(os.environ.get("MESHTRAIN_SOCKBUF_KIB", "0")) * 1024 or None
        ring = Ring.connect(
            listener,
            rank,
            addrs,
            job="bench",
            generation=1,
            timeout=60.0,
            chunk_bytes=chunk,
            sockbuf=sockbuf,
            keyring=keyring,
        )
        assert ring.authenticated == (auth or encrypt)
        assert (ring._link is not None and ring._link.encrypted) == encrypt
        out = {}
        for size in sizes:
            buf = np.random.default_rng(rank).standard_normal(size // 4).astype(np.float32)
            wire_dtype = None if wire == "float32" else wire
            out[size] = _timed(lambda b=buf, w=wire_dtype: ring.allreduce(b, wire_dtype=w), iters, 2)
        ring.close()
    return out


def worker_mlx(rank: int, addrs: list[tuple[str, int]], sizes: list[int], iters: int, wire: str) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump([[f"{h}:{p}"] for h, p in addrs], f)
    os.environ["MLX_RANK"] = str(rank)
    os.environ["MLX_HOSTFILE"] = f.name
    import mlx.core as mx

    group = mx.distributed.init(backend="ring", strict=True)
    assert group.size() == len(addrs), group.size()
    out = {}
    for size in sizes:
        x = mx.array(np.random.default_rng(rank).standard_normal(size // 4).astype(np.float32))
        mx.eval(x)
        out[size] = _timed(lambda x=x: mx.eval(mx.distributed.all_sum(x, group=group)), iters, 2)
    os.unlink(f.name)
    return out


def worker_gloo(rank: int, addrs: list[tuple[str, int]], sizes: list[int], iters: int, wire: str) -> dict:
    import torch
    import torch.distributed as dist

    host, port = addrs[0]
    dist.init_process_group("gloo", init_method=f"tcp://{host}:{port}", rank=rank, world_size=len(addrs))
    out = {}
    for size in sizes:
        t = torch.from_numpy(np.random.default_rng(rank).standard_normal(size // 4).astype(np.float32))
        out[size] = _timed(lambda t=t: dist.all_reduce(t), iters, 2)
    dist.destroy_process_group()
    return out


def worker_tcp(rank: int, addrs: list[tuple[str, int]], sizes: list[int], iters: int, wire: str) -> dict:
    """Each member sends `size` bytes right while receiving `size` from the left."""
    n = len(addrs)
    listener = socket.create_server(addrs[rank], reuse_port=False)
    right = None
    while right is None:
        try:
            right = socket.create_connection(addrs[(rank + 1) % n])
        except OSError:
            time.sleep(0.05)
    left, _ = listener.accept()
    for s in (left, right):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out = {}
    for size in sizes:
        send_buf, recv_buf = bytearray(size), bytearray(size)
        view = memoryview(recv_buf)

        def exchange(send_buf: bytearray = send_buf, view: memoryview = view, size: int = size) -> None:
            sender = threading.Thread(target=right.sendall, args=(send_buf,))
            sender.start()
            got = 0
            while got < size:
                got += left.recv_into(view[got:])
            sender.join()
            # a one-byte token around the ring keeps every member in the same round
            right.sendall(b"t")
            left.recv_into(view[:1])

        out[size] = _timed(exchange, iters, 2)
    for s in (left, right, listener):
        s.close()
    return out


def worker_meshtrain_auth(
    rank: int, addrs: list[tuple[str, int]], sizes: list[int], iters: int, wire: str
) -> dict:
    return worker_meshtrain(rank, addrs, sizes, iters, wire, auth=True)


def worker_meshtrain_enc(
    rank: int, addrs: list[tuple[str, int]], sizes: list[int], iters: int, wire: str
) -> dict:
    return worker_meshtrain(rank, addrs, sizes, iters, wire, encrypt=True)


WORKERS = {
    "meshtrain": worker_meshtrain,
    "meshtrain-auth": worker_meshtrain_auth,
    "meshtrain-enc": worker_meshtrain_enc,
    "mlx": worker_mlx,
    "tcp": worker_tcp,
    "gloo": worker_gloo,
}


def worker_main(args: argparse.Namespace) -> None:
    addrs = [(h, int(p)) for h, p in (a.rsplit(":", 1) for a in args.addrs.split(","))]
    sizes = [int(s) for s in args.sizes.split(",")]
    result = WORKERS[args.backend](args.rank, addrs, sizes, args.iters, args.wire)
    if args.rank == 0:
        print("RESULT " + json.dumps({str(k): v for k, v in result.items()}), flush=True)


# --- what authentication and encryption cost one core ------------------------------------


def cipher_speed(chunk: int, seconds: float = 1.0) -> None:
    """Per-core throughput of what the ring does to every byte: HMAC-SHA256 tag, AES-256-GCM seal/open.

    Run alone (no ring): the CPU ceiling each mode puts on one direction of one link.
    """
    import hashlib
    import hmac

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from meshtrain.security.aead import AEAD_TAG_BYTES

    key, nonce, head = os.urandom(32), os.urandom(12), b"h" * 64
    aead = AESGCM(key)  # what FrameCipher calls (one fixed nonce is fine for timing only)
    payload = memoryview(bytearray(os.urandom(chunk)))
    sealed = memoryview(bytearray(chunk + AEAD_TAG_BYTES))
    plain = memoryview(bytearray(chunk))
    aead.encrypt_into(nonce, payload, head, sealed)

    def tag() -> None:
        mac = hmac.new(key, head, hashlib.sha256)
        mac.update(payload)
        mac.digest()

    def copy() -> None:
        plain[:] = payload

    cores = os.cpu_count()
    print(f"# per-core cost on {chunk // 1024} KiB frames (one thread; the machine has {cores} cores)")
    for name, fn in (
        ("memcpy", copy),
        ("hmac-sha256 tag", tag),
        ("gmac tag (ring auth)", lambda: aead.encrypt(nonce, head, payload)),
        ("aes-256-gcm seal", lambda: aead.encrypt_into(nonce, payload, head, sealed)),
        ("aes-256-gcm open", lambda: aead.decrypt_into(nonce, sealed, head, plain)),
    ):
        n, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            fn()
            n += 1
        print(f"{name:>20}: {n * chunk / elapsed / 1e6:8.0f} MB/s")


# --- driver ------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def run_round(
    backend: str,
    wire: str,
    n: int,
    sizes: list[int],
    iters: int,
    cluster: object | None,
    torch_path: str = "",
) -> dict:
    if cluster is None:
        addrs = [("127.0.0.1", p) for p in free_ports(n)]
    else:
        base = 29000 + int(time.time() * 10) % 3000
        addrs = [(cluster.ip(i), base + i) for i in range(n)]  # type: ignore[attr-defined]
    addr_arg = ",".join(f"{h}:{p}" for h, p in addrs)
    env = dict(os.environ)
    if os.path.exists(OPENBLAS):
        env["LD_PRELOAD"] = OPENBLAS
    if backend == "gloo" and torch_path:
        env["PYTHONPATH"] = torch_path + os.pathsep + env.get("PYTHONPATH", "")
    procs = []
    for rank in range(n):
        prefix = cluster.exec_prefix(rank) if cluster is not None else []  # type: ignore[attr-defined]
        if backend == "gloo":  # gloo must be told which interface carries the ring; quiet c10d warnings
            env["TORCH_CPP_LOG_LEVEL"] = "ERROR"
            env["GLOO_SOCKET_IFNAME"] = f"{cluster.prefix}h{rank}" if cluster is not None else "lo"  # type: ignore[attr-defined]
        cmd = [*prefix, sys.executable, os.path.abspath(__file__), "--worker", "--backend", backend]
        cmd += ["--rank", str(rank), "--addrs", addr_arg, "--sizes", ",".join(map(str, sizes))]
        cmd += ["--iters", str(iters), "--wire", wire]
        procs.append(subprocess.Popen(cmd, env=dict(env), stdout=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=900)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"{backend} N={n} failed: exit codes {[p.returncode for p in procs]}")
    line = next(line for line in outs[0].splitlines() if line.startswith("RESULT "))
    return {int(k): v for k, v in json.loads(line[7:]).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--backend", default="meshtrain")
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--addrs", default="")
    ap.add_argument("--wire", default="float32")
    ap.add_argument("--sizes", default="1,4,16,64", help="MiB, comma separated")
    ap.add_argument("--ns", default="2,3,4", help="world sizes, comma separated")
    ap.add_argument("--iters", type=int, default=5, help="timed all-reduces per size per round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of all backends")
    ap.add_argument("--backends", default="meshtrain,mlx,tcp", help="also: gloo (needs torch)")
    ap.add_argument(
        "--wire-dtype",
        default=None,
        choices=["bfloat16", "float16"],
        help="also run meshtrain with this wire dtype (busbw counted in fp32 bytes)",
    )
    ap.add_argument(
        "--auth",
        default="off",
        choices=["off", "on", "both"],
        help="ring authentication: off, on, or both interleaved (ratio meshtrain-auth/meshtrain)",
    )
    ap.add_argument(
        "--encrypt",
        default="off",
        choices=["off", "on", "both"],
        help="ring encryption (AES-256-GCM): off, on, or both interleaved (ratio meshtrain-enc/meshtrain)",
    )
    ap.add_argument("--prefix", default="rg", help="network namespace prefix with --netns")
    ap.add_argument("--netns", action="store_true", help="one host per namespace on a shaped LAN")
    ap.add_argument("--rate", default="1gbit", help="link rate with --netns")
    ap.add_argument("--torch-path", default="", help="extra PYTHONPATH where torch is installed (for gloo)")
    ap.add_argument(
        "--chunk-kib", type=int, default=0, help="meshtrain sub-chunk size (default: the library's)"
    )
    ap.add_argument(
        "--cipher-speed",
        action="store_true",
        help="only measure per-core HMAC-SHA256 and AES-256-GCM throughput on ring-sized frames",
    )
    args = ap.parse_args()
    if args.worker:
        worker_main(args)
        return
    if args.cipher_speed:
        cipher_speed(args.chunk_kib * 1024 or MiB)
        return

    if args.chunk_kib:
        os.environ["MESHTRAIN_CHUNK_KIB"] = str(args.chunk_kib)
    variants = [(b, "float32") for b in args.backends.split(",")]
    if args.auth != "off" or args.encrypt != "off":
        from meshtrain.security import Keyring, generate_secret

        os.environ["MESHTRAIN_SECRET"] = Keyring([generate_secret()]).to_text()  # inherited by workers
        at = next((i for i, (b, _) in enumerate(variants) if b == "meshtrain"), 0)
        added = [("meshtrain-auth", "float32")] if args.auth != "off" else []
        added += [("meshtrain-enc", "float32")] if args.encrypt != "off" else []
        variants[at + 1 : at + 1] = added
        if "on" in (args.auth, args.encrypt) and "both" not in (args.auth, args.encrypt):
            variants = [v for v in variants if v[0] != "meshtrain"]
    if args.wire_dtype:
        variants.insert(1, ("meshtrain", args.wire_dtype))
    sizes = [int(float(s) * MiB) for s in args.sizes.split(",")]
    times: dict[tuple[int, int, str], list[float]] = defaultdict(list)
    link = f"namespaces, {args.rate}" if args.netns else "loopback"
    print(
        f"# all-reduce bench on {link}, {os.cpu_count()} cores; float32 buffers; "
        f"{args.rounds} interleaved rounds x {args.iters} timed iterations",
        flush=True,
    )
    for n in [int(x) for x in args.ns.split(",")]:
        cluster = None
        if args.netns:
            from meshtrain.netns import Cluster

            cluster = Cluster(n, prefix=args.prefix, rate=args.rate).up()
        try:
            for _ in range(args.rounds):
                for backend, wire in variants:
                    result = run_round(backend, wire, n, sizes, args.iters, cluster, args.torch_path)
                    for size, ts in result.items():
                        times[(n, size, f"{backend}" + ("" if wire == "float32" else f"-{wire}"))] += ts
        finally:
            if cluster is not None:
                cluster.down()
        report(n, sizes, variants, times)


def report(n: int, sizes: list[int], variants: list[tuple[str, str]], times: dict) -> None:
    names = [b + ("" if w == "float32" else f"-{w}") for b, w in variants]
    print(f"\nN={n}  (median ms | busbw MB/s)")
    print(f"{'size':>8} " + " ".join(f"{name:>24}" for name in names) + "   ratios")
    for size in sizes:
        bw = {}
        cells = []
        for name in names:
            t = statistics.median(times[(n, size, name)])
            if name == "tcp":
                bw[name] = size / t / 1e6  # the link's throughput: what a perfect ring's busbw equals
            else:
                bw[name] = 2 * (n - 1) / n * size / t / 1e6
            cells.append(f"{t * 1e3:10.2f} | {bw[name]:9.1f}")
        base = "meshtrain" if "meshtrain" in bw else names[0]  # with --auth on: the authenticated ring
        ratios = [f"{base}/{o}={bw[base] / bw[o]:.2f}" for o in names if o.split("-")[0] != "meshtrain"]
        ratios += [
            f"{o}/{base}={bw[o] / bw[base]:.2f}" for o in names if o.startswith("meshtrain-") and o != base
        ]
        if "meshtrain-enc" in bw and "meshtrain-auth" in bw and base != "meshtrain-auth":
            ratios.append(f"meshtrain-enc/meshtrain-auth={bw['meshtrain-enc'] / bw['meshtrain-auth']:.2f}")
        print(f"{size / MiB:6.0f}Mi " + " ".join(f"{c:>24}" for c in cells) + "   " + " ".join(ratios))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
