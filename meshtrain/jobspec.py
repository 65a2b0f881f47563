"""The job specification, defined once: what `meshtrain run` asked for, typed, and its two encodings.

A job's specification is written by the CLI (`meshtrain run`, `meshtrain sweep`),
carried by the agents (the `run` request, the `job.prepare` header, the job's
replicated record) and read by every worker. It used to travel as a loose dict
that each hop re-parsed its own way; here it is three frozen dataclasses:

- `JobOptions`: the run options every worker of the job gets (checkpoints,
  batch shares, `--data`, `--notify`, `--report-to`'s tracking, `--ledger`, and
  the per-worker `joiner` flag the coordinator adds);
- `JobSpec`: the whole request without its bundle (script, its arguments,
  `--nodes`, `--min-nodes`, `--wait`, the options);
- `WorkerSpec`: one worker's part of a job, handed to `python -m
  meshtrain.worker` in its environment.

Two encodings, each with one reader and one writer here:

- the wire (`to_wire`/`from_wire`): the plain msgpack/JSON dict the control
  protocol and the job record carry, the same keys as before this module
  existed plus a version ``v``. Missing keys take their defaults (so a sender
  that predates ``v`` is read as version 1); an unknown key, a value of the
  wrong type or a newer version is refused with one `JobSpecError` line: a
  node must not start a job it would half understand.
- the environment (`WorkerSpec.to_env`/`from_env`): $MESHTRAIN_JOB_SPEC as JSON,
  plus the variables of meshtrain.env a worker falls back on when the job's
  options do not say (``$MESHTRAIN_SHARES``, ``$MESHTRAIN_LEDGER_DIR``,
  ``$MESHTRAIN_ON_BATTERY``), set by `join` for the workers of its node.

`JobOptions` is also a read-only `Mapping` over its wire form, so the modules
that parse their own part of it (`CheckpointOptions.from_dict`, the notify
hook, the tracking recorder, the checkpoint leader's `ckpt.progress`) read it
as the dict that travels. Nothing here imports MLX, asyncio or the agent: the
CLI imports it to build the parser's result, the worker to start.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from meshtrain import env as env_names
from meshtrain.errors import UserError
from meshtrain.train.share_modes import DEFAULT_SHARE_MODE, SHARE_MODES

__all__ = ["WIRE_VERSION", "JobOptions", "JobSpec", "JobSpecError", "WorkerSpec"]

WIRE_VERSION = 1  # bump when a key changes meaning; a reader refuses a version newer than its own
DEFAULT_SCRIPT = "script.py"  # what a spec without a script names (an old sender's record)
ON_BATTERY_DEFAULT = "reduce"  # join --on-battery's default: a node on battery takes a smaller share


class JobSpecError(UserError):
    """A job specification this node cannot take: the message is the one line to show."""


# --- checking values read from the wire --------------------------------------------------------


def _refuse(what: str, key: str, expected: str, value: Any) -> JobSpecError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return JobSpecError(f"job spec: {what} {key!r} must be {expected}, not {shown}")


def _str(what: str, key: str, value: Any, *, optional: bool = True) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise _refuse(what, key, "text" + (" or absent" if optional else ""), value)
    return value


def _int(what: str, key: str, value: Any, *, minimum: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _refuse(what, key, f"a whole number of at least {minimum}", value)
    return value


def _bool(what: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _refuse(what, key, "true or false", value)
    return value


def _strings(what: str, key: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise _refuse(what, key, "a list of text", value)
    return tuple(value)


def _table(what: str, key: str, value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise _refuse(what, key, "a table (text keys)", value)
    return dict(value)


def _unknown(what: str, given: Mapping[str, Any], known: tuple[str, ...]) -> None:
    extra = sorted(str(k) for k in given if k not in known)
    if extra:
        raise JobSpecError(
            f"job spec: unknown {what} {', '.join(map(repr, extra))} (a newer meshtrain sent it? "
            "run the same version on every node)"
        )


# --- the options ------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobOptions(Mapping[str, Any]):
    """The options every worker of a job gets; each field is absent from the wire when unset.

    Checkpoint fields keep the names meshtrain.checkpoints.options documents
    (`CheckpointOptions.from_dict` validates them further). `tracking` and
    `data` are tables owned by meshtrain.tracking and meshtrain.agent.data_transfer
    (git commit, `--report-to`, a sweep's trial; the data's digest, path, origin).
    """

    checkpoint_every: str | None = None  # "200" steps or "30s"/"5m"/"1h"; None: no periodic checkpoints
    run: str | None = None  # the run's name its checkpoints are filed under
    replicas: int | None = None  # --checkpoint-replicas
    keep: int | None = None  # --keep
    resume: bool = False  # --resume
    shares: str | None = None  # perf | equal; None: the node's $MESHTRAIN_SHARES, else perf
    shard_replicas: int | None = None  # --shard-replicas: nodes holding each optimizer shard (None: auto)
    tracking: dict[str, Any] | None = None  # the run's record (meshtrain.tracking.options)
    notify: tuple[str, ...] = ()  # --notify targets, in meshtrain.notify.targets' text form
    notify_when: tuple[str, ...] = ()  # --notify-when conditions, meshtrain.notify.condition's text form
    ledger: str | None = None  # --ledger DIR (debug)
    data: dict[str, Any] | None = None  # --data PATH (meshtrain.agent.data_transfer.prepare_submission)
    joiner: bool | None = None  # set by the coordinator per worker: it joins a job already training

    KEYS: ClassVar[tuple[str, ...]] = (
        "checkpoint_every",
        "run",
        "replicas",
        "keep",
        "resume",
        "shares",
        "shard_replicas",
        "tracking",
        "notify",
        "notify_when",
        "ledger",
        "data",
        "joiner",
    )

    def __post_init__(self) -> None:
        if self.shares is not None and self.shares not in SHARE_MODES:
            raise _refuse("option", "shares", " or ".join(SHARE_MODES), self.shares)

    def to_wire(self) -> dict[str, Any]:
        """The dict that travels: only what is set (an empty dict for a job with no options)."""
        out: dict[str, Any] = {}
        for key in self.KEYS:
            value = getattr(self, key)
            if value is None or (key in ("resume", "notify", "notify_when") and not value):
                continue
            out[key] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any] | None) -> JobOptions:
        """From the wire's dict; JobSpecError (one line) for an unknown key or a bad value."""
        if raw is None:
            return cls()
        if isinstance(raw, JobOptions):
            return raw
        if not isinstance(raw, Mapping):
            raise _refuse("field", "options", "a table", raw)
        _unknown("option", raw, cls.KEYS)
        what = "option"
        return cls(
            checkpoint_every=_str(what, "checkpoint_every", raw.get("checkpoint_every")),
            run=_str(what, "run", raw.get("run")),
            replicas=_int(what, "replicas", raw.get("replicas"), minimum=0),
            keep=_int(what, "keep", raw.get("keep"), minimum=1),
            resume=_bool(what, "resume", raw.get("resume", False)),
            shares=_str(what, "shares", raw.get("shares")),
            shard_replicas=_int(what, "shard_replicas", raw.get("shard_replicas"), minimum=1),
            tracking=_table(what, "tracking", raw.get("tracking")),
            notify=_strings(what, "notify", raw.get("notify")),
            notify_when=_strings(what, "notify_when", raw.get("notify_when")),
            ledger=_str(what, "ledger", raw.get("ledger")),
            data=_table(what, "data", raw.get("data")),
            joiner=None if raw.get("joiner") is None else _bool(what, "joiner", raw.get("joiner")),
        )

    def replace(self, **changes: Any) -> JobOptions:
        return dataclasses.replace(self, **changes)

    @property
    def checkpointing(self) -> bool:
        """Whether the job checkpoints at all (periodically, or to resume from one)."""
        return bool(self.checkpoint_every) or self.resume

    # the read-only Mapping over the wire form (for the modules that parse their own part of it)

    def __getitem__(self, key: str) -> Any:
        return self.to_wire()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_wire())

    def __len__(self) -> int:
        return len(self.to_wire())


# --- the job ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobSpec:
    """What `meshtrain run` asked for, without the bundle (the script's directory travels apart)."""

    script: str = DEFAULT_SCRIPT  # the script's file name inside the bundle
    args: tuple[str, ...] = ()  # the script's own arguments, untouched
    nodes: str | None = None  # --nodes: a count ("3") or names ("a,b"); None: every node that is up
    min_nodes: int | None = None  # --min-nodes
    wait: float = 0.0  # --wait: seconds to wait for the nodes
    options: JobOptions = field(default_factory=JobOptions)

    KEYS: ClassVar[tuple[str, ...]] = ("v", "script", "args", "nodes", "min_nodes", "wait", "options")

    def to_wire(self) -> dict[str, Any]:
        """The dict the `run` request's header, `job.prepare` and the job record carry."""
        return {
            "v": WIRE_VERSION,
            "script": self.script,
            "args": list(self.args),
            "nodes": self.nodes,
            "min_nodes": self.min_nodes,
            "wait": self.wait,
            "options": self.options.to_wire(),
        }

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any] | None) -> JobSpec:
        """From the wire's dict: missing keys defaulted, anything unknown or malformed one JobSpecError."""
        raw = raw or {}
        if not isinstance(raw, Mapping):
            raise JobSpecError(f"job spec: expected a table, not {type(raw).__name__}")
        _unknown("field", raw, cls.KEYS)
        version = raw.get("v", 1)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise _refuse("field", "v", "a version number", version)
        if version > WIRE_VERSION:
            raise JobSpecError(
                f"job spec version {version} is newer than this node's ({WIRE_VERSION}): "
                "upgrade meshtrain on this node"
            )
        wait = raw.get("wait", 0.0)
        if wait is None:
            wait = 0.0
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or wait < 0 or wait != wait:
            raise _refuse("field", "wait", "zero or more seconds", wait)
        return cls(
            script=_str("field", "script", raw.get("script", DEFAULT_SCRIPT), optional=False)
            or DEFAULT_SCRIPT,
            args=_strings("field", "args", raw.get("args")),
            nodes=_str("field", "nodes", raw.get("nodes")),
            min_nodes=_int("field", "min_nodes", raw.get("min_nodes"), minimum=1),
            wait=float(wait),
            options=JobOptions.from_wire(raw.get("options")),
        )

    @classmethod
    def from_header(cls, header: Mapping[str, Any]) -> JobSpec:
        """The spec inside a `run` request's header (which also names its op, protocol, --detach...)."""
        return cls.from_wire({k: header[k] for k in cls.KEYS if k in header})

    def replace(self, **changes: Any) -> JobSpec:
        return dataclasses.replace(self, **changes)


# --- one worker's part ------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    """One worker's part of a job: what `python -m meshtrain.worker` is started with.

    The fields down to `options` travel as JSON in $MESHTRAIN_JOB_SPEC; the last
    three are the node's defaults, read from their own variables (meshtrain.env)
    because they belong to the node (`join`'s flags), not to the job.
    """

    job: str
    rank: int
    size: int
    node: str
    script: str  # the script's path, extracted from the bundle on this node
    args: tuple[str, ...] = ()
    generation: int = 0
    bind: str = "0.0.0.0"  # where the worker's ring listener binds
    report_fd: int | None = None  # the pipe the worker reports on (msgpack)
    member: str | None = None  # this worker's id in the job's views (the node's name, "~k" if re-admitted)
    options: JobOptions = field(default_factory=JobOptions)
    node_shares: str | None = None  # $MESHTRAIN_SHARES
    node_ledger: str | None = None  # $MESHTRAIN_LEDGER_DIR
    on_battery: str | None = None  # $MESHTRAIN_ON_BATTERY: continue | reduce | leave

    JSON_KEYS: ClassVar[tuple[str, ...]] = (
        "job",
        "rank",
        "size",
        "node",
        "script",
        "args",
        "generation",
        "bind",
        "report_fd",
        "member",
        "options",
        "v",
    )
    ENV: ClassVar[dict[str, str]] = {
        "node_shares": env_names.SHARES,
        "node_ledger": env_names.LEDGER_DIR,
        "on_battery": env_names.ON_BATTERY,
    }

    @property
    def member_id(self) -> str:
        return self.member or self.node

    @property
    def share_mode(self) -> str:
        """The job's --shares, else the node's, else perf."""
        return self.options.shares or self.node_shares or DEFAULT_SHARE_MODE

    @property
    def ledger_dir(self) -> str | None:
        return self.options.ledger or self.node_ledger

    @property
    def battery_policy(self) -> str:
        return self.on_battery or ON_BATTERY_DEFAULT

    def to_env(self) -> dict[str, str]:
        """The variables to start the worker with (the node's defaults only where set)."""
        spec = {
            "v": WIRE_VERSION,
            "job": self.job,
            "rank": self.rank,
            "size": self.size,
            "node": self.node,
            "script": self.script,
            "args": list(self.args),
            "generation": self.generation,
            "bind": self.bind,
            "report_fd": self.report_fd,
            "member": self.member,
            "options": self.options.to_wire(),
        }
        out = {env_names.JOB_SPEC: json.dumps(spec)}
        for name, variable in self.ENV.items():
            value = getattr(self, name)
            if value is not None:
                out[variable] = value
        return out

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WorkerSpec:
        """From the worker's environment; JobSpecError (one line) when the spec is missing or malformed."""
        environ = os.environ if environ is None else environ
        text = environ.get(env_names.JOB_SPEC)
        if text is None:
            raise JobSpecError(f"${env_names.JOB_SPEC} is not set: a meshtrain agent starts workers")
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise JobSpecError(f"${env_names.JOB_SPEC} is not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise JobSpecError(f"${env_names.JOB_SPEC} must hold a table")
        _unknown("worker field", raw, cls.JSON_KEYS)
        version = raw.get("v", 1)
        if not isinstance(version, int) or version > WIRE_VERSION:
            raise JobSpecError(f"${env_names.JOB_SPEC} version {version!r} is not {WIRE_VERSION}")
        what = "worker field"
        for key in ("job", "node", "script"):
            if key not in raw:
                raise JobSpecError(f"job spec: {what} {key!r} is missing")
        rank = _int(what, "rank", raw.get("rank", 0), minimum=0)
        size = _int(what, "size", raw.get("size", 1), minimum=1)
        generation = _int(what, "generation", raw.get("generation", 0), minimum=0)
        return cls(
            job=str(_str(what, "job", raw["job"], optional=False)),
            rank=rank or 0,
            size=size or 1,
            node=str(_str(what, "node", raw["node"], optional=False)),
            script=str(_str(what, "script", raw["script"], optional=False)),
            args=_strings(what, "args", raw.get("args")),
            generation=generation or 0,
            bind=str(_str(what, "bind", raw.get("bind", "0.0.0.0"), optional=False)),
            report_fd=_int(what, "report_fd", raw.get("report_fd"), minimum=0),
            member=_str(what, "member", raw.get("member")),
            options=JobOptions.from_wire(raw.get("options")),
            **{name: environ.get(variable) or None for name, variable in cls.ENV.items()},
        )
