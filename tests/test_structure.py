"""The architecture holds (issue 15): the agent never loads MLX, no import cycles, only the CLI
and the UI itself import the UI. Read from the source, so a deferred import counts too."""

from __future__ import annotations

import subprocess
import sys

from meshtrain.testing.imports import cycles, import_graph


def test_the_agent_does_not_load_mlx() -> None:
    code = "import meshtrain.agent.agent, sys; assert 'mlx.core' not in sys.modules, 'mlx.core loaded'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_no_import_cycles_among_meshtrains_modules() -> None:
    assert cycles(import_graph()) == []


def test_only_the_cli_and_the_ui_import_the_ui() -> None:
    def is_ui(m: str) -> bool:
        return m == "meshtrain.ui" or m.startswith("meshtrain.ui.")

    def may_import_ui(m: str) -> bool:
        return is_ui(m) or m == "meshtrain.cli" or m.startswith("meshtrain.cli.")

    offenders = {
        m: sorted(t for t in ts if is_ui(t)) for m, ts in import_graph().items() if not may_import_ui(m)
    }
    assert {m: ts for m, ts in offenders.items() if ts} == {}


def test_the_graph_sees_deferred_and_relative_imports() -> None:
    graph = import_graph()
    assert "meshtrain.checkpoints.arrays" in graph["meshtrain.checkpoints.store"]  # inside a method
    assert "meshtrain.errors" in graph["meshtrain.cli"] or any(
        "meshtrain.errors" in graph[m] for m in graph if m.startswith("meshtrain.cli")
    )
