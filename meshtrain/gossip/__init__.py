"""Gossip membership and LAN discovery (SWIM + Lifeguard), sans-I/O core with an asyncio shell.

node = GossipNode.from_config("mac-mini", GossipConfig(profile="lan", port=7946), meta={...})
await node.start(); node.members(); node.subscribe(cb); await node.leave()
"""

from meshtrain.gossip.config import DEFAULT_GOSSIP_PORT, GossipConfig
from meshtrain.gossip.discovery import DISCOVERY_PORT
from meshtrain.gossip.member import ALIVE, DEAD, LEFT, SUSPECT, Addr, Member, MemberEvent
from meshtrain.gossip.membership import Membership
from meshtrain.gossip.meta import local_meta
from meshtrain.gossip.node import GossipNode, run
from meshtrain.gossip.profiles import PROFILES, Profile

__all__ = [
    "ALIVE",
    "DEAD",
    "DEFAULT_GOSSIP_PORT",
    "DISCOVERY_PORT",
    "LEFT",
    "SUSPECT",
    "PROFILES",
    "Addr",
    "GossipConfig",
    "GossipNode",
    "Member",
    "MemberEvent",
    "Membership",
    "Profile",
    "local_meta",
    "run",
]
