"""`meshtrain join --detach`, a second join on the same machine, and `leave`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from meshtrain.security import load_keyring, parse_token


def meshtrain(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MESHTRAIN_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "meshtrain", *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_detached_agent_serves_status_refuses_a_second_join_and_leaves(tmp_path: Path) -> None:
    home = tmp_path / "home"
    flags = ["--name", "solo", "--profile", "local", "--host", "127.0.0.1", "--port", "0", "--no-discovery"]
    started = meshtrain(home, "join", "--detach", *flags)
    try:
        assert started.returncode == 0, started.stderr
        assert started.stdout.startswith("agent solo running in the background (pid ")
        assert (home / "agent.sock").stat().st_mode & 0o777 == 0o600
        snap = json.loads(meshtrain(home, "status", "--json").stdout)
        assert [n["name"] for n in snap["nodes"]] == ["solo"] and snap["leader"] == snap["nodes"][0]["id"]
        # the first join created the mesh secret (0600) and printed the command that joins it
        assert (home / "secret").stat().st_mode & 0o777 == 0o600
        hint = started.stdout.splitlines()[1]
        assert hint.startswith("to add another machine, run there:  meshtrain join --token mt1.")
        token = parse_token(hint.split("--token ")[1])
        assert token.secret == load_keyring(home / "secret")[0].primary
        assert token.seed == snap["nodes"][0]["addr"]  # the port it really got, not the 0 asked for
        second = meshtrain(home, "join", *flags)
        assert second.returncode != 0 and second.stderr.strip() == (
            "meshtrain: an agent (solo) is already running on this machine; see it with `meshtrain status`"
        )
    finally:
        left = meshtrain(home, "leave")
    assert left.returncode == 0 and left.stdout.strip() == "the agent on this machine left the mesh"
    deadline = time.monotonic() + 15
    while "solo left the mesh" not in (home / "agent.log").read_text():  # it says goodbye, then exits
        assert time.monotonic() < deadline, (home / "agent.log").read_text()
        time.sleep(0.1)
