"""`meshtrain run --data PATH` through the real product: the bytes every worker reads are the submitter's,
a second run sends nothing, a missing path is one line; and the transfer itself over a real authenticated
control connection: a changed (corrupt) file is detected, the rest kept, and the next attempt fetches only
what is missing."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from meshtrain.agent.control import ControlServer
from meshtrain.agent.data_transfer import (
    DataCache,
    TransferError,
    build_manifest,
    fetch_from,
    prepare_submission,
    serve_fetch,
)
from meshtrain.security import Keyring, generate_secret
from tests.test_mesh_agents import AgentProcess, alive_names, wait_for

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "scripts" / "data_digest.py"
DATA_LINE = re.compile(r"\[(\S+)\] DATA rank=(\d+) rel=(\S+) files=(\d+) sha=([0-9a-f]{64})")


def make_corpus(root: Path) -> tuple[Path, str]:
    """A directory of random bytes, text, a nested file and an empty one; the digest data_digest.py prints."""
    corpus = root / "corpus"
    (corpus / "nested" / "deeper").mkdir(parents=True)
    (corpus / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))  # several 1 MiB chunks, and a tail
    (corpus / "a.txt").write_text("to be or not to be\n" * 100)
    (corpus / "nested" / "deeper" / "c.npy").write_bytes(os.urandom(4096))
    (corpus / "nested" / "empty").write_bytes(b"")
    h = hashlib.sha256()
    for f in sorted(p for p in corpus.rglob("*") if p.is_file()):
        h.update(f.relative_to(corpus).as_posix().encode())
        h.update(f.read_bytes())
    return corpus, h.hexdigest()


def run(cwd: Path, home: Path, *args: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MESHTRAIN_HOME": str(home)}
    cmd = [sys.executable, "-m", "meshtrain", "run", *args]
    return subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def workers_saw(out: str) -> dict[str, tuple[str, int, str]]:
    return {m[0]: (m[2], int(m[3]), m[4]) for m in DATA_LINE.findall(out)}


@pytest.mark.timeout(240)
def test_two_agents_every_worker_reads_the_submitters_bytes_and_a_second_run_sends_nothing(
    tmp_path: Path,
) -> None:
    corpus, want = make_corpus(tmp_path)
    a = AgentProcess(tmp_path / "a", "a")
    agents = [a]
    try:
        agents.append(AgentProcess(tmp_path / "b", "b", token=a.token))
        wait_for(lambda: alive_names(a.home) == {"a", "b"}, timeout=30)
        first = run(tmp_path, a.home, "--nodes", "2", "--data", "corpus", str(SCRIPT))
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        saw = workers_saw(first.stdout)
        assert saw == {"a": ("corpus", 4, want), "b": ("corpus", 4, want)}, first.stdout[-3000:]
        assert re.search(
            r"\[b\] data [0-9a-f]{12} \(3\.2 MB in 4 file\(s\)\): fetched 3\.2 MB from a", first.stdout
        )
        digest = build_manifest(corpus).digest
        copy = tmp_path / "b" / "data" / digest / "content"  # b's cache, in its own state home
        assert (copy / "big.bin").read_bytes() == (corpus / "big.bin").read_bytes()
        assert not (tmp_path / "a" / "data" / digest).exists()  # the submitter serves its own path
        stamp = (copy / "big.bin").stat().st_mtime_ns

        second = run(tmp_path, a.home, "--nodes", "2", "--data", "corpus", str(SCRIPT))
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        assert workers_saw(second.stdout) == saw
        assert "cached on b, nothing fetched" in second.stdout
        assert "fetched" not in second.stdout.replace("nothing fetched", "")
        assert (copy / "big.bin").stat().st_mtime_ns == stamp
    finally:
        for agent in agents:
            agent.stop()


@pytest.mark.timeout(180)
def test_local_mesh_file_data_arrives_identical_then_cached(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (tmp_path / "text").mkdir()
    text = tmp_path / "text" / "plays.txt"
    text.write_bytes(os.urandom(1_500_000))
    want = hashlib.sha256(text.read_bytes()).hexdigest()
    first = run(tmp_path, home, "--local", "2", "--data", "text/plays.txt", str(SCRIPT))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert workers_saw(first.stdout) == {
        "node1": ("text/plays.txt", 1, want),
        "node2": ("text/plays.txt", 1, want),
    }
    assert "[node2] data " in first.stdout and "fetched 1.5 MB from node1" in first.stdout
    second = run(tmp_path, home, "--local", "2", "--data", "text/plays.txt", str(SCRIPT))
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "cached on node2, nothing fetched" in second.stdout
    assert workers_saw(second.stdout)["node2"] == ("text/plays.txt", 1, want)


def test_a_missing_or_unreadable_data_path_is_one_line(tmp_path: Path) -> None:
    home = tmp_path / "home"
    missing = run(tmp_path, home, "--local", "2", "--data", "no/such/dir", str(SCRIPT), timeout=60)
    assert missing.returncode != 0
    assert missing.stderr.strip() == "meshtrain: --data no/such/dir: no such file or directory"
    if os.geteuid() != 0:  # root reads everything
        locked = tmp_path / "locked.txt"
        locked.write_text("x")
        locked.chmod(0)
        out = run(tmp_path, home, "--local", "2", "--data", "locked.txt", str(SCRIPT), timeout=60)
        assert out.returncode != 0 and out.stderr.strip().count("\n") == 0 and "not readable" in out.stderr


def test_corrupt_bytes_are_detected_kept_parts_are_not_sent_again(tmp_path: Path) -> None:
    corpus, _ = make_corpus(tmp_path)
    home = tmp_path / "submitter"
    option = prepare_submission(str(corpus), home)
    digest = option["digest"]
    manifest = build_manifest(corpus)
    keyring = Keyring([generate_secret()])
    total = manifest.total_bytes

    async def scenario() -> tuple[int, int]:
        async def handler(header: dict, payload: bytes, conn: object) -> None:  # type: ignore[type-arg]
            await serve_fetch(header, payload, conn, lambda d: (corpus, manifest) if d == digest else None)

        server = ControlServer(handler, keyring=keyring)
        port = await server.start_tcp("127.0.0.1", 0)
        cache = DataCache(tmp_path / "receiver" / "data")
        nested = corpus / "nested" / "deeper" / "c.npy"  # sorted after a.txt and big.bin
        good = nested.read_bytes()
        nested.write_bytes(bytes(b ^ 0xFF for b in good))  # the same size, other bytes
        try:
            with pytest.raises(TransferError, match="arrived corrupt"):
                await fetch_from(("127.0.0.1", port), "sub", digest, cache, node="recv", keyring=keyring)
            assert cache.content(digest) is None  # nothing listed as complete
            nested.write_bytes(good)
            where, again = await fetch_from(
                ("127.0.0.1", port), "sub", digest, cache, node="recv", keyring=keyring
            )
            assert where == cache.content(digest)
            for f in corpus.rglob("*"):
                if f.is_file():
                    assert (where / f.relative_to(corpus)).read_bytes() == f.read_bytes()
            return again, len(good)
        finally:
            await server.close()

    again, rest = asyncio.run(scenario())
    assert again == rest < total  # the files that had arrived intact were not sent again


def test_a_node_without_the_secret_gets_nothing(tmp_path: Path) -> None:
    corpus, _ = make_corpus(tmp_path)
    manifest = build_manifest(corpus)

    async def scenario() -> None:
        async def handler(header: dict, payload: bytes, conn: object) -> None:  # type: ignore[type-arg]
            await serve_fetch(header, payload, conn, lambda d: (corpus, manifest))

        server = ControlServer(handler, keyring=Keyring([generate_secret()]))
        port = await server.start_tcp("127.0.0.1", 0)
        cache = DataCache(tmp_path / "stranger")
        try:
            with pytest.raises(TransferError):
                await fetch_from(
                    ("127.0.0.1", port),
                    "sub",
                    manifest.digest,
                    cache,
                    node="x",
                    keyring=Keyring([generate_secret()]),
                )
            assert cache.content(manifest.digest) is None
        finally:
            await server.close()

    asyncio.run(scenario())


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mounts a small tmpfs (root)")
def test_a_node_out_of_disk_fails_the_job_in_one_line(tmp_path: Path) -> None:
    corpus, _ = make_corpus(tmp_path)
    home = tmp_path / "small"
    home.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(home)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        out = run(tmp_path, home, "--local", "2", "--data", "corpus", str(SCRIPT), timeout=120)
    finally:
        subprocess.run(["umount", str(home)])
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"meshtrain: job failed: node2 is out of disk space for the job's data: it needs 3\.2 MB "
        r"\(and keeps 67\.1 MB free\), \d+\.\d MB are free in " + re.escape(f"{home}/data"),
        last,
    ), last
