"""Hyper-parameter sweeps over the mesh: `meshtrain sweep` (Optuna's samplers and pruners).

- `space.py`  the `--param` / `--objective` forms, as Optuna distributions;
- `driver.py` ask, run each trial as a job on its own nodes, report, prune, tell; the summary;
- `launch.py` where the jobs go: an in-process `--local N` mesh or this machine's agent.
"""
