"""meshtrain.jobspec: the job specification's wire and environment forms round-trip; bad ones are refused."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshtrain import env as env_names
from meshtrain.jobspec import WIRE_VERSION, JobOptions, JobSpec, JobSpecError, WorkerSpec

text = st.text(min_size=1, max_size=20)
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**31), 2**31), text)
table = st.dictionaries(text, st.one_of(json_scalar, st.lists(json_scalar, max_size=3)), max_size=4)

options_st = st.builds(
    JobOptions,
    checkpoint_every=st.one_of(st.none(), st.sampled_from(["200", "30s", "5m"])),
    run=st.one_of(st.none(), text),
    replicas=st.one_of(st.none(), st.integers(0, 5)),
    keep=st.one_of(st.none(), st.integers(1, 5)),
    resume=st.booleans(),
    shares=st.one_of(st.none(), st.sampled_from(["perf", "equal"])),
    tracking=st.one_of(st.none(), table),
    notify=st.lists(text, max_size=3).map(tuple),
    ledger=st.one_of(st.none(), text),
    data=st.one_of(st.none(), table),
    joiner=st.one_of(st.none(), st.booleans()),
)
spec_st = st.builds(
    JobSpec,
    script=text,
    args=st.lists(st.text(max_size=30), max_size=5).map(tuple),
    nodes=st.one_of(st.none(), text),
    min_nodes=st.one_of(st.none(), st.integers(1, 64)),
    wait=st.floats(0, 1e6, allow_nan=False),
    options=options_st,
)
worker_st = st.builds(
    WorkerSpec,
    job=text,
    rank=st.integers(0, 100),
    size=st.integers(1, 100),
    node=text,
    script=text,
    args=st.lists(st.text(max_size=30), max_size=5).map(tuple),
    generation=st.integers(0, 1000),
    bind=st.sampled_from(["0.0.0.0", "127.0.0.1"]),
    report_fd=st.one_of(st.none(), st.integers(0, 1000)),
    member=st.one_of(st.none(), text),
    options=options_st,
    node_shares=st.one_of(st.none(), st.sampled_from(["perf", "equal"])),
    node_ledger=st.one_of(st.none(), text),
    on_battery=st.one_of(st.none(), st.sampled_from(["continue", "reduce", "leave"])),
)


@settings(max_examples=200, deadline=None)
@given(spec_st)
def test_wire_round_trip_through_json(spec: JobSpec) -> None:
    wire = json.loads(json.dumps(spec.to_wire()))  # what msgpack/JSON carry: lists, no tuples
    assert JobSpec.from_wire(wire) == spec
    assert wire["v"] == WIRE_VERSION


@settings(max_examples=200, deadline=None)
@given(options_st)
def test_options_wire_round_trip_and_mapping(options: JobOptions) -> None:
    wire = options.to_wire()
    assert JobOptions.from_wire(json.loads(json.dumps(wire))) == options
    assert dict(options) == wire  # the read-only Mapping is the wire form
    assert bool(options) == bool(wire)
    assert all(v is not None for v in wire.values())  # unset fields are absent, not null


@settings(max_examples=200, deadline=None)
@given(worker_st)
def test_env_round_trip(spec: WorkerSpec) -> None:
    environ = spec.to_env()
    assert set(environ) <= {env_names.JOB_SPEC, env_names.SHARES, env_names.LEDGER_DIR, env_names.ON_BATTERY}
    assert all(isinstance(v, str) for v in environ.values())
    assert WorkerSpec.from_env(environ) == spec


def test_worker_resolution_order() -> None:
    """The job's --shares/--ledger win over the node's defaults, which win over meshtrain's."""
    bare = WorkerSpec(job="j", rank=0, size=1, node="n", script="s.py")
    assert (bare.share_mode, bare.ledger_dir, bare.battery_policy, bare.member_id) == (
        "perf",
        None,
        "reduce",
        "n",
    )
    node = WorkerSpec.from_env(
        {
            **bare.to_env(),
            env_names.SHARES: "equal",
            env_names.LEDGER_DIR: "/l",
            env_names.ON_BATTERY: "leave",
        }
    )
    assert (node.share_mode, node.ledger_dir, node.battery_policy) == ("equal", "/l", "leave")
    ours = WorkerSpec(
        job="j", rank=0, size=1, node="n", script="s.py", options=JobOptions(shares="perf", ledger="/mine")
    )
    both = WorkerSpec.from_env({**ours.to_env(), env_names.SHARES: "equal", env_names.LEDGER_DIR: "/l"})
    assert (both.share_mode, both.ledger_dir) == ("perf", "/mine")


def test_todays_wire_is_read() -> None:
    """What agents sent before the version key (a record's spec, a run header) still reads."""
    old = {
        "script": "mnist.py",
        "args": ["--epochs", "2"],
        "nodes": "2",
        "min_nodes": None,
        "wait": 30.0,
        "options": {
            "shares": "perf",
            "tracking": {"git": {"commit": "abc"}},
            "run": "mnist",
            "replicas": 2,
            "keep": 3,
            "checkpoint_every": "200",
            "joiner": False,
        },
    }
    spec = JobSpec.from_wire(old)
    assert spec.args == ("--epochs", "2") and spec.options.checkpoint_every == "200"
    assert spec.options.joiner is False and spec.options.tracking == {"git": {"commit": "abc"}}
    assert {k: v for k, v in spec.to_wire().items() if k != "v"} == old  # the same dict goes on
    assert JobSpec.from_wire({}) == JobSpec()  # every key missing: the defaults
    header = {"op": "run", "proto": 3, "detach": True, **spec.to_wire()}
    assert JobSpec.from_header(header) == spec


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ({"options": {"batch": 32}}, "unknown option 'batch'"),
        ({"colour": "red"}, "unknown field 'colour'"),
        ({"v": WIRE_VERSION + 1}, f"job spec version {WIRE_VERSION + 1} is newer"),
        ({"v": "one"}, "'v' must be a version number"),
        ({"args": "--lr 1"}, "'args' must be a list of text"),
        ({"args": [1, 2]}, "'args' must be a list of text"),
        ({"min_nodes": 0}, "'min_nodes' must be a whole number of at least 1"),
        ({"min_nodes": True}, "'min_nodes' must be a whole number"),
        ({"wait": -1}, "'wait' must be zero or more seconds"),
        ({"wait": "soon"}, "'wait' must be zero or more seconds"),
        ({"nodes": 3}, "'nodes' must be text"),
        ({"options": {"shares": "fastest"}}, "'shares' must be perf or equal"),
        ({"options": {"keep": 0}}, "'keep' must be a whole number of at least 1"),
        ({"options": {"resume": "yes"}}, "'resume' must be true or false"),
        ({"options": {"tracking": ["x"]}}, "'tracking' must be a table"),
        ({"options": "fast"}, "'options' must be a table"),
    ],
)
def test_refused_in_one_line(raw: dict[str, Any], says: str) -> None:
    with pytest.raises(JobSpecError) as caught:
        JobSpec.from_wire(raw)
    message = str(caught.value)
    assert says in message, message
    assert "\n" not in message


def test_worker_env_refusals() -> None:
    with pytest.raises(JobSpecError, match="is not set"):
        WorkerSpec.from_env({})
    with pytest.raises(JobSpecError, match="not JSON"):
        WorkerSpec.from_env({env_names.JOB_SPEC: "{"})
    with pytest.raises(JobSpecError, match="'node' is missing"):
        WorkerSpec.from_env({env_names.JOB_SPEC: json.dumps({"job": "j", "script": "s.py"})})
    with pytest.raises(JobSpecError, match="unknown worker field 'gpu'"):
        WorkerSpec.from_env(
            {env_names.JOB_SPEC: json.dumps({"job": "j", "node": "n", "script": "s", "gpu": 1})}
        )


def test_worker_refuses_a_bad_spec_in_one_line(tmp_path: Any) -> None:
    """A real worker process given a malformed spec: one line on stderr, exit 2, no traceback."""
    bad = json.dumps({"job": "j", "node": "n", "script": "s.py", "options": {"shares": "fastest"}})
    proc = subprocess.run(
        [sys.executable, "-m", "meshtrain.worker"],
        env={"PATH": "/usr/bin:/bin", env_names.JOB_SPEC: bad, env_names.HOME: str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "meshtrain.worker: job spec: option 'shares' must be perf or equal, not 'fastest'"
    ]


def test_job_request_takes_the_wire_dict_and_keeps_the_wire() -> None:
    """A caller holding the wire's options (a sweep trial) builds a typed request; the record is the wire."""
    from meshtrain.agent.jobs import JobRequest

    request = JobRequest(
        "s.py", ["--lr", "0.1"], b"", nodes="a,b", options={"shares": "equal", "tracking": {}}
    )
    assert isinstance(request.options, JobOptions) and request.options.shares == "equal"
    again = JobRequest.from_spec(request.spec(), b"")
    assert again == request
    with pytest.raises(JobSpecError, match="unknown option 'gpus'"):
        JobRequest("s.py", [], b"", options={"gpus": 2})
