"""A job that reports what `meshtrain run --data` gave it: the path, and a digest of every byte."""

import hashlib
import os

import meshtrain

mesh = meshtrain.init()
where = mesh.data_path
assert where is not None, "the job was started without --data"
files = sorted(p for p in where.rglob("*") if p.is_file()) if where.is_dir() else [where]
h = hashlib.sha256()
for f in files:
    h.update(f.relative_to(where).as_posix().encode() if where.is_dir() else b"")
    h.update(f.read_bytes())
print(
    f"DATA rank={mesh.rank} rel={os.path.relpath(where)} files={len(files)} sha={h.hexdigest()}", flush=True
)
for _ in mesh.batches(4, 2):  # one tiny epoch: every worker forms the ring and leaves cleanly
    pass
mesh.close()
