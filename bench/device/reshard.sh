# bench/reshard.py on a lent 16-core machine (no network there): a lost node's take-over (stage 1,
# --shard-replicas 2) beside the roll-backs, for a larger MLP than the 2-core machine runs.
# Carry the ignored wheel folder: run with carry [".whl"] (see bench/device/sharded.sh).
# HIDDEN (default 8192: 67.3M parameters, 807 MB of fp32 AdamW training state), STAGES, STEPS.
source bench/device/env.sh
python3 -c 'import mlx.core as mx, numpy; print("mlx", mx.__version__, "numpy", numpy.__version__)' || exit 1
H=${HIDDEN:-8192}
python3 bench/reshard.py --stages "${STAGES:-1r,1,2}" --hidden "$H" --steps "${STEPS:-14}" \
  | tee "$OUT/reshard_h${H}_16core.txt"
