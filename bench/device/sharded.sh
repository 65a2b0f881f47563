# bench/sharded.py on a lent 16-core machine (no network there): the ~300M-parameter memory table.
# Carry the ignored wheel folder: run with carry [".venv/zero-whl"] (mlx, mlx_cpu, cryptography, cffi,
# pycparser, msgpack, psutil, rich wheels for the machine's Python; Debian's OpenBLAS .debs).
# NS=1,2 or NS=4 (one call each fits the 10-minute limit); DIM/LAYERS/STEPS as bench/sharded.py's.
W=.venv/zero-whl
NS=${NS:-1,2}
PY=$(python3 -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
WHEELS=()
for f in $W/*.whl; do  # the wheels for this Python (and the version-free ones), in one install
  case "$f" in *-cp3*-cp3*) [[ "$f" == *"-$PY-$PY-"* ]] || continue;; esac
  WHEELS+=("$f")
done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "${WHEELS[@]}" 2>&1 | grep -v "Running pip as the 'root'" || true
for f in $W/*.deb; do dpkg -x "$f" /tmp/ob; done
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MESHTRAIN_OFFLINE=1
export MESHTRAIN_BLAS=/tmp/ob/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3
ldconfig -p | grep -q 'libgfortran.so.5 ' || export LD_LIBRARY_PATH=/tmp/ob/usr/lib/x86_64-linux-gnu
python3 -c 'import mlx.core as mx, numpy; print("mlx", mx.__version__, "numpy", numpy.__version__)' || exit 1
python3 bench/sharded.py --ns "$NS" --dim "${DIM:-1024}" --layers "${LAYERS:-24}" \
  --steps "${STEPS:-2}" | tee "$OUT/sharded_n${NS//,/_}.txt"
