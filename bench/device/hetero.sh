#!/bin/bash
# Lead, session 3 (issue 9): the heterogeneous pair on the quiet 16-core device machine.
cd "$(dirname "$0")/../.." || exit 1  # the repository root; wheels and .debs in its ignored .whl/ folder
source bench/device/env.sh || exit 1
grep cgroup /proc/self/mounts | head -3; cat /sys/fs/cgroup/cgroup.controllers 2>/dev/null
timeout -s INT -k 20 ${HETERO_S:-520} python3 bench/scaling.py --hetero --model mlp --epochs 4 --batch-size 2048 --links 1gbit \
  --hetero-repeats ${REPEATS:-2} 2>&1 | tee $OUT/hetero.txt
