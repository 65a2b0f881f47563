"""Gossip membership and LAN discovery (SWIM + Lifeguard), sans-I/O core with an asyncio shell.

node = GossipNode(name="mac-mini", meta={...}, profile=PROFILES["lan"], port=7946)
await node.start(); node.members(); node.subscribe(cb); await node.leave()
"""

from meshtrain.gossip.discovery import DISCOVERY_PORT
from meshtrain.gossip.member import ALIVE, DEAD, LEFT, SUSPECT, Addr, Member, MemberEvent
from meshtrain.gossip.membership import Membership
from meshtrain.gossip.meta import local_meta
from meshtrain.gossip.node import GossipNode, run
from meshtrain.gossip.profiles import PROFILES, Profile

__all__ = [
    "ALIVE",
    "DEAD",
    "DISCOVERY_PORT",
    "LEFT",
    "SUSPECT",
    "PROFILES",
    "Addr",
    "GossipNode",
    "Member",
    "MemberEvent",
    "Membership",
    "Profile",
    "local_meta",
    "run",
]
