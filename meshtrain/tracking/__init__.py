"""Experiment tracking: every job is a recorded run, comparable, exportable, taggable.

- `store.py`     the embedded SQLite store (WAL) in the state home: runs, metrics, tags;
- `record.py`    pure: what a run record holds, built from the job request and the reports;
- `recorder.py`  the agent's side: records the jobs it coordinates and replicates them to peers;
- `capture.py`   the worker's side: hyper-parameters from argparse and the worker's software versions;
- `views.py`     the terminal views of `meshtrain runs` (list, show, compare, a loss sparkline);
- `export.py`    csv, jsonl and tensorboard exports of a run;
- `reporters.py` `run --report-to tensorboard|mlflow|wandb|trackio`: the same metrics through them.

Nothing here needs a server: the record lives in ``$MESHTRAIN_HOME/runs.sqlite`` of every node
that ran the job (see `recorder.py` for how the copies are kept).
"""

from meshtrain.tracking.store import RunStore, runs_db_path

__all__ = ["RunStore", "runs_db_path"]
