# bench/sharded.py on a lent 16-core machine (no network there): the ~300M-parameter memory table.
# Carry the ignored wheel folder: run with carry [".whl"] (bench/device/README.md: mlx, mlx_cpu,
# cryptography, cffi, pycparser for the machine's Python; Debian's OpenBLAS .debs).
# NS=1,2 or NS=4 (one call each fits the 10-minute limit); STAGES, DIM, LAYERS, STEPS, CAP_MB as
# bench/sharded.py's --stages, --dim, --layers, --steps, --cap-mb.
source bench/device/env.sh
python3 -c 'import mlx.core as mx, numpy; print("mlx", mx.__version__, "numpy", numpy.__version__)' || exit 1
NS=${NS:-1,2}
CAP=()
[ -n "${CAP_MB:-}" ] && CAP=(--cap-mb "$CAP_MB")
python3 bench/sharded.py --ns "$NS" --stages "${STAGES:-0,1,2,3}" --dim "${DIM:-1024}" --layers "${LAYERS:-24}" \
  --steps "${STEPS:-2}" "${CAP[@]}" | tee "$OUT/sharded_n${NS//,/_}${CAP_MB:+_cap$CAP_MB}.txt"
