"""How a node takes part in gossip, as one value: `GossipConfig`.

`meshtrain join`'s flags (`--profile`, `--host`, `--port`, `--seed`,
`--interface`, `--no-discovery`), `run --local`'s loopback mesh and the tests
all describe the same thing: where the node listens, whom it asks first, how
it finds peers on the LAN and which timing profile it keeps. Before this
module those six values were copied one by one from the CLI into the agent and
from the agent into `GossipNode`; now the CLI builds one `GossipConfig`, the
agent keeps it whole and `GossipNode.from_config` reads it, so adding a knob
is one field here, not an edit in every hop.

What is *not* here: who the node is (its name, persistent id, incarnation),
what it carries (meta) and the mesh secret (keyring) -- those belong to the
node's identity and security, not to how it gossips.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from meshtrain.errors import UserError
from meshtrain.gossip.profiles import PROFILES, Profile

__all__ = ["DEFAULT_GOSSIP_PORT", "GossipConfig"]

DEFAULT_GOSSIP_PORT = 7946
Addr = tuple[str, int]


@dataclass(frozen=True)
class GossipConfig:
    """Where a node listens, whom it joins through and how it finds peers; checked when built.

    `port=0` picks a free port (tests, `run --local`); `discovery_port=None`
    follows the gossip port (7946 -> 7947) so two agents on one machine with
    different `--port`s do not collide on beacons.
    """

    profile: str = "lan"
    host: str = "0.0.0.0"
    port: int = DEFAULT_GOSSIP_PORT
    seeds: tuple[Addr, ...] = field(default_factory=tuple)
    interface: str | None = None
    discovery: bool = True
    discovery_port: int | None = None
    advertise: str | None = None  # the address peers should use, when the bound one is not it

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            known = ", ".join(sorted(PROFILES))
            raise UserError(f"unknown gossip profile {self.profile!r} (one of: {known})")
        if not 0 <= self.port <= 65535:
            raise UserError(f"gossip port must be 0 to 65535, not {self.port}")
        if self.discovery_port is not None and not 0 < self.discovery_port <= 65535:
            raise UserError(f"discovery port must be 1 to 65535, not {self.discovery_port}")
        seeds: list[Addr] = []
        for seed in self.seeds:
            host, port = seed
            if not 0 < int(port) <= 65535:
                raise UserError(f"seed {host}:{port}: the port must be 1 to 65535")
            seeds.append((str(host), int(port)))
        object.__setattr__(self, "seeds", tuple(seeds))

    @property
    def timing(self) -> Profile:
        """The protocol's timing profile (probe interval, suspicion, fan-out) this config names."""
        return PROFILES[self.profile]

    def with_seeds(self, seeds: Any) -> GossipConfig:
        """The same config joining through other seeds (the loopback mesh's later nodes)."""
        return replace(self, seeds=tuple(seeds))
