"""How a job splits each global batch between its workers, named once for the CLI, agent and worker.

"perf": by measured speed, power state and free memory (meshtrain.train.shares);
"equal": the same share each (exact reproducibility across runs: resume bit for bit).
Kept apart from shares.py so the CLI can name the choices without importing numpy.
"""

from __future__ import annotations

PERF, EQUAL = "perf", "equal"
SHARE_MODES = (PERF, EQUAL)
DEFAULT_SHARE_MODE = PERF
