"""`meshtrain join --encrypt` end to end: real agents on loopback train over an encrypted ring.

The first agent starts with --encrypt, the second joins with nothing but the
token it printed (the token carries the setting), and `meshtrain run` trains
on both: the workers inherit the setting with the secret and their ring
encrypts. A third agent holding the mesh's key but started without
--encrypt is never a member, and its packets are counted as `mode_mismatch`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_mesh_agents import TINY, alive_names, cli, meshtrain_cmd, wait_for

from meshtrain.security import Keyring, parse_token

pytestmark = pytest.mark.timeout(90)
ENCRYPTED = "getattr(getattr(mesh._ring, '_link', None), 'encrypted', None)"  # after an all-reduce
SCRIPT = TINY.replace(
    "\nif mesh.is_main:", f'\nprint(f"ring encrypted {{{ENCRYPTED}}}", flush=True)\nif mesh.is_main:', 1
)
assert SCRIPT != TINY


class Joined:
    """`meshtrain join ...` in the background with its own state directory."""

    def __init__(self, home: Path, name: str, *extra: str, env: dict[str, str] | None = None) -> None:
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        args = ["join", "--name", name, "--profile", "local", "--host", "127.0.0.1", "--port", "0"]
        self.proc = subprocess.Popen(
            meshtrain_cmd(*args, "--no-discovery", *extra),
            env={**os.environ, "MESHTRAIN_HOME": str(home), **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        assert "gossip port" in first, first
        self.port = int(first.split("gossip port ")[1].split(")")[0])
        hint = self.proc.stdout.readline()
        assert "meshtrain join --token " in hint, hint
        self.token = hint.split("--token ")[1].strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def test_an_encrypted_mesh_of_two_agents_trains_and_a_plain_node_is_kept_out(tmp_path: Path) -> None:
    script = tmp_path / "work" / "tiny.py"
    script.parent.mkdir()
    script.write_text(SCRIPT)
    a = Joined(tmp_path / "a", "a", "--encrypt")
    agents = [a]
    try:
        assert parse_token(a.token).encrypt  # what the first `join --encrypt` printed carries the setting
        b = Joined(tmp_path / "b", "b", "--token", a.token)  # no --encrypt: the token says so
        agents.append(b)
        assert "encrypt" in (tmp_path / "b" / "secret").read_text().split()  # kept for the next start
        plain_secret = Keyring(Keyring.from_text((tmp_path / "a" / "secret").read_text(), "a").keys)
        (tmp_path / "p").mkdir()
        plain = subprocess.run(  # the right key, without --encrypt: the seed refuses it, and it says so
            meshtrain_cmd(
                *("join", "--name", "plain", "--profile", "local", "--host", "127.0.0.1", "--port", "0"),
                *("--no-discovery", "--seed", f"127.0.0.1:{a.port}"),
            ),
            env={
                **os.environ,
                "MESHTRAIN_HOME": str(tmp_path / "p"),
                "MESHTRAIN_SECRET": plain_secret.to_text(),
            },
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert plain.returncode != 0, plain.stdout[-1000:]
        assert "its --encrypt setting differs from the mesh's" in plain.stdout + plain.stderr
        wait_for(lambda: alive_names(a.home) == {"a", "b"})

        out = cli(a.home, "run", "--nodes", "2", str(script), "x")
        assert out.returncode == 0, out.stderr
        assert "[a] weighted mean 1.6667" in out.stdout  # (1*1 + 2*2) / (1 + 2)
        assert "[a] ring encrypted True" in out.stdout and "[b] ring encrypted True" in out.stdout

        def mismatches() -> int:
            status = cli(a.home, "status", "--json")
            assert status.returncode == 0, status.stderr
            return int(json.loads(status.stdout).get("drops", {}).get("mode_mismatch", 0))

        wait_for(lambda: mismatches() >= 1)
        assert alive_names(a.home) == {"a", "b"}  # the plain node was never a member
    finally:
        for agent in reversed(agents):
            agent.stop()
    assert sys.executable  # the agents ran under this interpreter
