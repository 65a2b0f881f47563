"""Gossip membership at scale: the real state machine, N nodes, virtual clock, lossy network.

For each N: how long (virtual seconds, and gossip rounds) until a join and a death
are known to every node; detection time of crashed nodes (median, p99); false
deaths and suspicions at several packet-loss rates over a long run; bytes per node
per second (UDP gossip payload + TCP push-pull state). Profile: lan (printed).

    flock /tmp/meshtrain-bench.lock .venv/bin/python bench/gossip.py
    ... --sizes 10,100 --minutes 1      # quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict

from meshtrain.gossip.member import DEAD, SUSPECT
from meshtrain.gossip.profiles import PROFILES, Profile
from meshtrain.gossip.simulator import Simulator, Watch


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def joins(profile: Profile, n: int, count: int, seed: int) -> list[float]:
    """Seconds from a new node's join request until every node has it alive, one join at a time."""
    sim = Simulator(profile, seed=seed, decode=False)
    sim.populate(n)
    sim.run_until(3.0)
    out = []
    for k in range(count):
        new_id = f"n{len(sim.nodes)}"
        watch = Watch("joined", new_id)
        sim.listeners = [watch]
        start = sim.now
        sim.join(seed_index=(k * 7919) % n)

        def everyone(w: Watch = watch) -> bool:
            return len(w.times) == len(sim.nodes) - 1

        if sim.run_until(start + 60, stop=everyone):
            out.append(sim.now - start)
        sim.run_until(sim.now + 1.0)
    return out


def deaths(profile: Profile, n: int, count: int, seed: int) -> list[tuple[float, float]]:
    """(detection, known-by-all) seconds after a crash, for `count` crashes one after another."""
    sim = Simulator(profile, seed=seed, decode=False)
    sim.populate(n)
    sim.run_until(5.0)
    out = []
    for k in range(count):
        victim = 1 + (k * 7919) % (n - 1)
        if victim in sim.crashed:
            continue
        watch = Watch(DEAD, f"n{victim}")
        sim.listeners = [watch]
        start = sim.now
        sim.crash(victim)
        healthy = len(sim.nodes) - len(sim.crashed)

        def all_healthy(w: Watch = watch, h: int = healthy) -> bool:
            return len(w.times) == h

        if sim.run_until(start + 120, stop=all_healthy):
            times = sorted(watch.times.values())
            out.append((times[0] - start, times[-1] - start))
        sim.run_until(sim.now + 2.0)
    return out


def steady(profile: Profile, n: int, loss: float, seconds: float, seed: int) -> dict[str, float]:
    """A mesh left alone at `loss`: false deaths, suspicions, bytes per node per second."""
    sim = Simulator(profile, loss=loss, seed=seed, decode=False)
    counts = {DEAD: 0, SUSPECT: 0, "left": 0}
    first_suspects: set[tuple[str, int]] = set()

    def listen(now: float, i: int, ev: object) -> None:
        kind = ev.kind  # type: ignore[attr-defined]
        if kind in counts:
            counts[kind] += 1
        if kind == SUSPECT:
            m = ev.member  # type: ignore[attr-defined]
            first_suspects.add((m.id, m.incarnation))

    sim.listeners = [listen]
    sim.populate(n)
    sim.run_until(10.0)  # let initial push-pull jitter settle before counting bytes
    udp0, tcp0 = sum(sim.udp_bytes), sum(sim.tcp_bytes)
    t0 = time.perf_counter()
    sim.run_until(10.0 + seconds)
    cpu = time.perf_counter() - t0
    return {
        "false_deaths": counts[DEAD],
        "suspicion_episodes": len(first_suspects),
        "udp_Bps_per_node": (sum(sim.udp_bytes) - udp0) / n / seconds,
        "tcp_Bps_per_node": (sum(sim.tcp_bytes) - tcp0) / n / seconds,
        "live_everywhere": min(m.live_count for m in sim.nodes),
        "cpu_s": cpu,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10,100,1000")
    ap.add_argument("--losses", default="0,0.05,0.10")
    ap.add_argument("--minutes", type=float, default=10.0, help="virtual minutes of the false-death runs")
    ap.add_argument("--crashes", type=int, default=100)
    ap.add_argument("--joins", type=int, default=10)
    ap.add_argument("--profile", default="lan", choices=sorted(PROFILES))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    profile = PROFILES[args.profile]
    sizes = [int(s) for s in args.sizes.split(",")]
    losses = [float(x) for x in args.losses.split(",")]
    gi = profile.gossip_interval
    print(f"profile {profile.name}: {asdict(profile)}")
    print("network: latency uniform 0.2-2 ms per datagram, loss independent per datagram; virtual clock\n")
    results: dict[str, dict[str, object]] = {}
    for n in sizes:
        t0 = time.perf_counter()
        r: dict[str, object] = {}
        js = joins(profile, n, args.joins, args.seed)
        r["join_known_by_all_s"] = {"median": statistics.median(js), "p99": pct(js, 0.99), "samples": len(js)}
        print(
            f"N={n:5d} join -> known to all: median {statistics.median(js):.2f} s"
            f" ({statistics.median(js) / gi:.1f} rounds), p99 {pct(js, 0.99):.2f} s, {len(js)} joins"
        )
        ds = deaths(profile, n, min(args.crashes, max(1, n // 3)), args.seed)
        det = [d for d, _ in ds]
        allk = [a for _, a in ds]
        spread = [a - d for d, a in ds]
        r["death"] = {
            "detection_s": {"median": statistics.median(det), "p99": pct(det, 0.99)},
            "known_by_all_after_crash_s": {"median": statistics.median(allk), "p99": pct(allk, 0.99)},
            "known_by_all_after_declared_s": {"median": statistics.median(spread), "p99": pct(spread, 0.99)},
            "samples": len(ds),
        }
        med, p99 = statistics.median, pct
        print(
            f"N={n:5d} crash -> first 'dead': median {med(det):.2f} s, p99 {p99(det, 0.99):.2f} s"
            f" | crash -> known to all: median {med(allk):.2f} s, p99 {p99(allk, 0.99):.2f} s"
            f" | first 'dead' -> known to all: median {med(spread):.2f} s ({med(spread) / gi:.1f} rounds),"
            f" p99 {p99(spread, 0.99):.2f} s | {len(ds)} crashes"
        )
        for loss in losses:
            s = steady(profile, n, loss, args.minutes * 60, args.seed)
            r[f"loss_{loss:g}"] = s
            print(
                f"N={n:5d} loss {loss:4.0%} for {args.minutes:g} min: false deaths {s['false_deaths']},"
                f" suspicion episodes {s['suspicion_episodes']}, bytes/node/s UDP {s['udp_Bps_per_node']:.0f}"
                f" + TCP {s['tcp_Bps_per_node']:.0f} = {s['udp_Bps_per_node'] + s['tcp_Bps_per_node']:.0f}"
                f" (sim cpu {s['cpu_s']:.0f} s)"
            )
        print(f"N={n:5d} done in {time.perf_counter() - t0:.0f} s wall\n")
        sys.stdout.flush()
        results[str(n)] = r
    if len(sizes) >= 2 and 0.0 in losses:
        lo, hi = str(sizes[-2]), str(sizes[-1])

        def total(k: str) -> float:
            s = results[k]["loss_0"]
            return s["udp_Bps_per_node"] + s["tcp_Bps_per_node"]  # type: ignore[index]

        print(
            f"bytes/node/s at 0% loss, N={lo} -> N={hi}: {total(lo):.0f} -> {total(hi):.0f}"
            f" (ratio {total(hi) / total(lo):.2f}, target within 2x)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"profile": asdict(profile), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
