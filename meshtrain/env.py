"""Every environment variable meshtrain reads or sets, defined once, with what it is for.

A name is read in one module and set in another (the agent sets what its
workers read; a test sets what an agent reads), so both sides import it from
here instead of spelling the string twice.
"""

from __future__ import annotations

# --- where a node keeps its state (meshtrain.paths) ---------------------------------------------
HOME = "MESHTRAIN_HOME"  # the state dir: socket, checkpoints, runs, outputs (~/.local/state/meshtrain)
CHECKPOINT_DIR = "MESHTRAIN_CHECKPOINT_DIR"  # checkpoints instead of $MESHTRAIN_HOME/checkpoints (join, run)
CACHE = "MESHTRAIN_CACHE"  # decoded data-set arrays (default ~/.cache/meshtrain)
DATA = "MESHTRAIN_DATA"  # a directory of the user's IDX files
OFFLINE = "MESHTRAIN_OFFLINE"  # never download data

# --- the mesh secret (meshtrain.security.secret) ------------------------------------------------
SECRET = "MESHTRAIN_SECRET"  # the mesh key(s), comma-separated, instead of the stored secret file

# --- set by an agent for its workers (meshtrain.agent.workers -> meshtrain.worker) --------------
JOB_SPEC = "MESHTRAIN_JOB_SPEC"  # this worker's part of the job, JSON (meshtrain.jobspec.WorkerSpec)
CHECKPOINTS = "MESHTRAIN_CHECKPOINTS"  # the agent's checkpoint store, for the worker's own writes
ON_BATTERY = "MESHTRAIN_ON_BATTERY"  # join --on-battery: continue | reduce | leave
SHARES = "MESHTRAIN_SHARES"  # perf | equal, when the job's options do not say
DATA_PATH = "MESHTRAIN_DATA_PATH"  # where `run --data PATH` put the data for this worker (mesh.data_path)

# --- debugging and tests -----------------------------------------------------------------------
LEDGER_DIR = "MESHTRAIN_LEDGER_DIR"  # every worker logs the slices of each committed step there
FAULT = "MESHTRAIN_FAULT"  # "MEMBER:STEP:forward|allreduce": SIGKILL that worker there (tests, benches)
HANG_FLOOR = "MESHTRAIN_HANG_FLOOR_S"  # seconds a stopped worker is forgiven (default 15; tests shorten it)
POWER_FILE = "MESHTRAIN_POWER_FILE"  # a JSON file standing in for the battery/thermal probe
