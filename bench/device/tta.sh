#!/bin/bash
# Lead, session 3 (issue 9): the data-parallel ceiling's compute part and time-to-accuracy on the 16-core device.
# usage (device): bash bench/device/tta.sh   (carry .whl; writes $OUT/bound.txt, $OUT/tta_*.txt)
cd "$(dirname "$0")/../.." || exit 1  # the repository root; wheels and .debs in its ignored .whl/ folder
source bench/device/env.sh || exit 1
echo "== machine"; nproc; lscpu | grep -i 'model name'; python3 -V
MODE=--loopback
if ip netns add e3probe && ip -n e3probe link set lo up && ip netns exec e3probe tc qdisc add dev lo root tbf rate 1gbit burst 256kb latency 50ms \
   && ip link add e3p0 type veth peer name e3p1 && ip link del e3p0; then echo NETNS_OK; MODE=""; else echo NETNS_FAILED; fi
ip netns del e3probe 2>/dev/null; ip link del e3p0 2>/dev/null
[ -n "$SKIP_BOUND" ] || echo "== ceiling (compute part on 2 cores; statistics from this repo's 2-core run)"
[ -n "$SKIP_BOUND" ] || taskset -c 2,3 timeout 60 python3 bench/tta_bound.py --epochs-from bench/results/mlp98_epochs.json --local-sgd 2>&1 | tee $OUT/bound.txt
S="python3 bench/scaling.py $MODE --model mlp --target 98.0 --evals-per-epoch 8 --lr-scale none"
P="--batch-size ${BATCH:-1=256,2=512,4=1024} --lr 2e-3 --epochs ${EPOCHS:-1=3,2=4,4=6}"
if [ -z "$SKIP_1G" ]; then
echo "== 1 Gbit/s"
timeout -s INT -k 20 ${G1_S:-420} $S --nodes 1 2 4 8 --links 1gbit --modes bf16 local-sgd --n1-modes bf16 $P --max-run-s ${RUN_S:-45} 2>&1 | tee $OUT/tta_1gbit.txt
fi
if [ -n "$WIFI" ]; then
echo "== 100 Mbit/s"
timeout -s INT -k 20 ${W_S:-420} $S --nodes 1 2 4 8 --links 100mbit --modes local-sgd bf16 --n1-modes bf16 $P --max-run-s ${RUN_S:-45} 2>&1 | tee $OUT/tta_100mbit.txt
fi
