"""Rich live views of the mesh (`join`, `status`) and of a training job (`run`).

The views consume the snapshot dicts the agent produces (schemas in
`meshtrain.status`) and never import the model; on a terminal they are
rich renderables redrawn in place, elsewhere plain lines for logs and CI.
"""

from meshtrain.ui.job_view import JobView
from meshtrain.ui.live import LiveJob, LiveMesh, is_interactive
from meshtrain.ui.mesh_view import MeshView
from meshtrain.ui.plain import JobLog, MeshLog, final_line, render_job_text, render_mesh_text

__all__ = [
    "JobLog",
    "JobView",
    "LiveJob",
    "LiveMesh",
    "MeshLog",
    "MeshView",
    "final_line",
    "is_interactive",
    "render_job_text",
    "render_mesh_text",
]
