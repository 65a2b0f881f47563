#!/bin/bash
# Issue 20: does overlapping the all-reduce with the backward pass (buckets, last layer first) pay on the transformer?
# bench/overlap.py on examples/shakespeare.py's GPT, 2 ranks pinned to 2 cores each of the 16-core device, bf16 wire,
# on an unshaped loopback ring and on a loopback shaped to 1 Gbit/s (tbf on `lo` inside a network namespace, so both
# ranks' traffic crosses the shaped link).
# usage (device): bash bench/device/overlap.sh     carry .whl (as for peers.sh); writes $OUT/overlap.txt
# knobs: SIZES (tiny small), BATCH (8 windows a rank), STEPS (20), CORES (2 a rank), BUCKETS (4)
cd "$(dirname "$0")/../.." || exit 1
source bench/device/env.sh || exit 1
export CUDA_VISIBLE_DEVICES=""
{
echo "== machine"; nproc; lscpu | grep -i 'model name'; python3 -V
for size in ${SIZES:-tiny small}; do
  echo "== $size, loopback (unshaped)"
  timeout 200 python3 bench/overlap.py --model gpt --size $size --batch ${BATCH:-8} --steps ${STEPS:-20} \
    --cores-per-rank ${CORES:-2} --buckets ${BUCKETS:-4}
  echo "== $size, loopback shaped to 1 Gbit/s (netns, tbf on lo)"
  ip netns add ovl 2>/dev/null; ip -n ovl link set lo up
  if ip netns exec ovl tc qdisc add dev lo root tbf rate 1gbit burst 256kb latency 50ms; then
    ip netns exec ovl timeout 200 python3 bench/overlap.py --model gpt --size $size --batch ${BATCH:-8} \
      --steps ${STEPS:-20} --cores-per-rank ${CORES:-2} --buckets ${BUCKETS:-4}
  else echo "NETNS_FAILED: no shaped run"; fi
  ip netns del ovl 2>/dev/null
done
} 2>&1 | tee $OUT/overlap.txt
