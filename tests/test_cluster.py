"""Self-checks of the Valkey Cluster that tests/cluster.py starts for the session."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ClusterCrossSlotError, RedisClusterException

SLOTS = 16384
# Three keys of one workspace, and one of another workspace in another slot.
WORKSPACE_KEYS = ["cg:{ws:abc}:budget", "cg:{ws:abc}:calls", "cg:{ws:abc}:ledger"]
OTHER_KEY = "cg:{ws:xyz}:budget"

# Writes ARGV[1] to every key, then returns what each key now holds.
WRITE_ALL = """
for _, key in ipairs(KEYS) do
    redis.call('SET', key, ARGV[1])
end
return redis.call('MGET', unpack(KEYS))
"""


async def test_cluster_has_three_primaries_covering_every_slot(
    cluster_store: RedisCluster,
) -> None:
    """Three primaries serve the cluster, and together they own all 16384 slots."""
    primaries = {node.name for node in cluster_store.get_primaries()}
    assert len(primaries) == 3

    # cluster_slots() is annotated as a list, but redis-py's cluster client
    # parses the reply into {(first, last): {"primary": (host, port), ...}}.
    slot_map: dict[tuple[int, int], dict[str, Any]]
    slot_map = await cluster_store.execute_command("CLUSTER SLOTS")
    owned: set[int] = set()
    for (first, last), owners in slot_map.items():
        host, port = owners["primary"]
        assert f"{host}:{port}" in primaries
        owned.update(range(first, last + 1))
    assert owned == set(range(SLOTS))


async def test_cluster_keeps_a_workspace_in_one_slot(
    cluster_store: RedisCluster,
) -> None:
    """The client and the server put every ``{ws:abc}`` key in the same slot."""
    slots = {cluster_store.keyslot(key) for key in WORKSPACE_KEYS}
    assert len(slots) == 1
    for key in WORKSPACE_KEYS:
        assert await cluster_store.cluster_keyslot(key) in slots
    assert cluster_store.keyslot(OTHER_KEY) not in slots


async def test_cluster_runs_a_script_over_one_workspace(
    cluster_store: RedisCluster,
) -> None:
    """A registered script writes and reads several keys of one workspace."""
    write_all = cluster_store.register_script(WRITE_ALL)

    assert await write_all(keys=WORKSPACE_KEYS, args=["7"]) == ["7", "7", "7"]
    for key in WORKSPACE_KEYS:
        assert await cluster_store.get(key) == "7"


async def test_cluster_client_refuses_a_script_across_slots(
    cluster_store: RedisCluster,
) -> None:
    """redis-py stops a script whose keys span two slots before sending it."""
    write_all = cluster_store.register_script(WRITE_ALL)

    with pytest.raises(RedisClusterException, match="same key slot"):
        await write_all(keys=[WORKSPACE_KEYS[0], OTHER_KEY], args=["7"])
    assert await cluster_store.get(WORKSPACE_KEYS[0]) is None


async def test_cluster_server_refuses_a_script_across_slots(
    cluster_store: RedisCluster,
) -> None:
    """Sent straight to a node, a script over two slots fails with CROSSSLOT."""
    write_all = cluster_store.register_script(WRITE_ALL)
    await cluster_store.script_load(WRITE_ALL)
    node = cluster_store.get_node_from_key(WORKSPACE_KEYS[0])

    # Naming the node skips the client's own slot check, so the server decides.
    with pytest.raises(ClusterCrossSlotError):
        await cluster_store.execute_command(
            "EVALSHA",
            write_all.sha,
            2,
            WORKSPACE_KEYS[0],
            OTHER_KEY,
            "7",
            target_nodes=node,
        )
    assert await cluster_store.get(WORKSPACE_KEYS[0]) is None
    assert await cluster_store.get(OTHER_KEY) is None


@pytest.mark.parametrize("run", ["first", "second"])
async def test_cluster_store_starts_empty(
    cluster_store: RedisCluster, run: str
) -> None:
    """Each test finds every primary empty, whatever the one before it wrote."""
    # DBSIZE goes to one node unless told otherwise; the primaries' sizes sum.
    assert await cluster_store.dbsize(target_nodes=RedisCluster.PRIMARIES) == 0

    keys = [f"cg:{{ws:{n}}}:probe" for n in range(32)]
    for key in keys:
        await cluster_store.set(key, run)
    written_on = {_node_name(cluster_store, key) for key in keys}
    assert written_on == {node.name for node in cluster_store.get_primaries()}
    assert await cluster_store.dbsize(target_nodes=RedisCluster.PRIMARIES) == 32


def _node_name(client: RedisCluster, key: str) -> str:
    node = client.get_node_from_key(key)
    assert node is not None
    return node.name
