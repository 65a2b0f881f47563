# Sourced by the device recipes, from the repository root: the carried wheels and .debs, installed
# without a network (pip --target, dpkg -x), MLX on the carried OpenBLAS, iproute2 where the machine lacks it.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD MESHTRAIN_OFFLINE=1 PYTHONUNBUFFERED=1 MESHTRAIN_CACHE=/tmp/mtcache
for f in .whl/*.deb; do dpkg -x "$f" /tmp/ob; done
export MESHTRAIN_BLAS=/tmp/ob/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3
ldconfig -p | grep -q 'libgfortran.so.5 ' || export LD_LIBRARY_PATH=/tmp/ob/usr/lib/x86_64-linux-gnu
if ! which ip >/dev/null; then
  for f in .whl/ipr/*.deb; do dpkg -x "$f" /tmp/ipr; done
  mkdir -p /tmp/iprbin
  L=/tmp/ipr/usr/lib/x86_64-linux-gnu:/tmp/ipr/lib/x86_64-linux-gnu
  printf '#!/bin/sh\nexec /lib64/ld-linux-x86-64.so.2 --library-path %s /tmp/ipr/bin/ip "$@"\n' $L > /tmp/iprbin/ip
  printf '#!/bin/sh\nexec /lib64/ld-linux-x86-64.so.2 --library-path %s /tmp/ipr/sbin/tc "$@"\n' $L > /tmp/iprbin/tc
  chmod +x /tmp/iprbin/*; export PATH=/tmp/iprbin:$PATH
fi
