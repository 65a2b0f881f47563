"""GossipConfig: one value from the CLI to the gossip node, checked when built (gossip/config.py)."""

from __future__ import annotations

import asyncio

import pytest

from meshtrain.agent.agent import Agent
from meshtrain.errors import UserError
from meshtrain.gossip import PROFILES, GossipConfig, GossipNode


def test_defaults_are_a_lan_node_on_the_well_known_port() -> None:
    config = GossipConfig()
    assert (config.profile, config.host, config.port, config.seeds, config.discovery) == (
        "lan",
        "0.0.0.0",
        7946,
        (),
        True,
    )
    assert config.timing is PROFILES["lan"]


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"profile": "moon"}, "unknown gossip profile 'moon'"),
        ({"port": 70000}, "gossip port must be 0 to 65535"),
        ({"discovery_port": 0}, "discovery port must be 1 to 65535"),
        ({"seeds": (("10.0.0.1", 0),)}, "seed 10.0.0.1:0"),
    ],
)
def test_a_bad_value_is_one_line(kwargs: dict[str, object], says: str) -> None:
    with pytest.raises(UserError) as err:
        GossipConfig(**kwargs)  # type: ignore[arg-type]
    assert says in str(err.value) and "\n" not in str(err.value)


def test_seeds_are_normalised_and_with_seeds_keeps_the_rest() -> None:
    config = GossipConfig(profile="local", host="127.0.0.1", port=0, seeds=[("h", "7946")])  # type: ignore[list-item]
    assert config.seeds == (("h", 7946),)
    other = config.with_seeds([("127.0.0.1", 9000)])
    assert other.seeds == (("127.0.0.1", 9000),)
    assert (other.profile, other.host, other.port) == ("local", "127.0.0.1", 0)


def test_the_node_and_the_agent_read_the_config_whole() -> None:
    config = GossipConfig(profile="local", host="127.0.0.1", port=0, discovery=False)
    node = GossipNode.from_config("n1", config, {"k": 1})
    assert node.profile is PROFILES["local"]
    agent = Agent(name="a1", gossip=config, unix_socket=False)
    assert agent.gossip is config and agent.host == "127.0.0.1"


def test_two_nodes_from_configs_find_each_other() -> None:
    async def main() -> None:
        base = GossipConfig(profile="local", host="127.0.0.1", port=0, discovery=False)
        a = GossipNode.from_config("a", base)
        await a.start()
        b = GossipNode.from_config("b", base.with_seeds([("127.0.0.1", a.port)]))
        await b.start()
        try:
            for _ in range(100):
                if len(a.members()) == 2 and len(b.members()) == 2:
                    return
                await asyncio.sleep(0.05)
            raise AssertionError("the two nodes did not see each other")
        finally:
            await b.leave()
            await a.leave()

    asyncio.run(main())
