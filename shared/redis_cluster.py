"""redis-py's asyncio ``RedisCluster`` with three failure behaviours changed, so that one
shard's failover leaves the other shards alone (``tests/faults/test_redis_cluster.py`` shows
each one failing without its change, against redis-py 5.3).

1. **A failed node does not close every connection, nor stop the client.** On a connection
   error redis-py calls ``RedisCluster.aclose()``, which disconnects every node's connections,
   also those other tasks are using at that moment: their commands then die with
   ``AttributeError`` (not a ``RedisError``, so no caller retries them). And the next command
   of any task re-reads the slot map under the client's lock first, so while one shard is
   down (every command to it failing, each asking again) the healthy shards' commands queued
   behind map refreshes for up to a second at a time (measured). Here ``aclose`` called from
   inside a command closes nothing: it asks for a map refresh in the background, at most one
   every ``REFRESH_EVERY_S``, and commands go on with the map they have (a command that meets
   a moved slot follows ``MOVED``; one to the dead node fails fast and is retried by its
   caller). An ``aclose`` from our code (shutdown) closes everything as before. A write to a
   connection whose node died raises ``RuntimeError`` under uvloop; it becomes the
   ``ConnectionError`` it is.
2. **A fresh slot map keeps the nodes it already knew**, with their connections; redis-py
   replaces every node object, disconnecting connections in use.
3. **Refreshing the slot map does not depend on one node.** redis-py re-runs ``COMMAND`` on
   its default node, slot 0's master, at every refresh, and asks that node ``COMMAND GETKEYS``
   for each ``XREAD``/``XREADGROUP``: while slot 0's master was down, every command of the
   client, to every shard, failed. The command table does not change with the map, so it is
   read once; the stream reads' keys are found from their arguments (after ``STREAMS``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from contextvars import ContextVar
from typing import Any

import structlog
from redis._parsers.commands import AsyncCommandsParser
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, NodesManager, RedisCluster
from redis.exceptions import ConnectionError, RedisClusterException

from shared.redis_connection import write_now

_IN_COMMAND: ContextVar[bool] = ContextVar("slipstream_cluster_in_command", default=False)
_STREAM_READS = ("XREAD", "XREADGROUP")
REFRESH_EVERY_S = 0.25  # the slot map is re-read at most this often after failures

log = structlog.get_logger("slipstream.redis")


class _CommandsParser(AsyncCommandsParser):
    """Reads the command table once (it is the same on every node and every map)."""

    __slots__ = ()

    async def initialize(self, node: ClusterNode | None = None) -> None:
        if node is not None:
            self.node = node
        if not self.commands:
            await super().initialize(node)


class _NodesManager(NodesManager):
    """Keeps the node objects (and their connections) of nodes the new map still names."""

    __slots__ = ()

    def set_nodes(
        self,
        old: dict[str, ClusterNode],
        new: dict[str, ClusterNode],
        remove_old: bool = False,
    ) -> None:
        if old is not self.nodes_cache:
            super().set_nodes(old, new, remove_old)
            return
        for name, node in new.items():
            kept = old.get(name)
            if kept is not None and kept is not node:
                kept.server_type = node.server_type  # a replica may have become a master
                new[name] = kept
        super().set_nodes(old, new, remove_old)  # now only adds, and drops departed nodes

    async def initialize(self) -> None:
        for attempt in range(3):
            try:
                await super().initialize()
                break
            except RuntimeError as exc:  # a command dropped a failed node from startup_nodes
                if attempt == 2:  # while redis-py's loop iterated them: read the map again
                    raise RedisClusterException(f"slot map refresh: {exc}") from exc
        # the map was built with new node objects: point it at the ones kept
        known = self.nodes_cache
        self.slots_cache = {
            slot: [known.get(node.name, node) for node in nodes]
            for slot, nodes in self.slots_cache.items()
        }
        if self.default_node is not None:
            self.default_node = known.get(self.default_node.name, self.default_node)


class SlipstreamCluster(RedisCluster):
    """The cluster client ``shared.redis.connect`` returns for ``redis+cluster://`` URLs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands_parser = _CommandsParser()
        self.nodes_manager.__class__ = _NodesManager
        # every node's connections write at once and bound their handshake, as the other
        # clients' do (``shared/redis_connection.py``): redis-py's own waited for ever on a
        # node that accepts connections and never answers. Nodes found later are made from
        # the same arguments.
        options = self.nodes_manager.connection_kwargs
        options["connection_class"] = write_now(options["connection_class"])
        for node in self.nodes_manager.startup_nodes.values():
            node.connection_class = options["connection_class"]
        self._refresh: asyncio.Task[None] | None = None
        self._refreshed_at = 0.0

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        token = _IN_COMMAND.set(True)
        try:
            return await super().execute_command(*args, **kwargs)
        except RuntimeError as exc:
            raise _closed_transport(exc) from exc
        finally:
            _IN_COMMAND.reset(token)

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> Any:
        if transaction or shard_hint:
            return super().pipeline(transaction, shard_hint)  # refuses them, as redis-py does
        return _Pipeline(self)  # type: ignore[abstract]

    async def aclose(self) -> None:
        if _IN_COMMAND.get():  # redis-py after a failed node: re-read the map, close nothing
            self.refresh_soon()
            return
        if self._refresh is not None:
            self._refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._refresh
        await super().aclose()

    def refresh_soon(self) -> None:
        """Re-read the slot map in the background (at most one every ``REFRESH_EVERY_S``)."""
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.create_task(self._refresh_map())

    async def _refresh_map(self) -> None:
        """Re-read the slot map beside the commands (which keep the map they have)."""
        await asyncio.sleep(max(0.0, self._refreshed_at + REFRESH_EVERY_S - time.monotonic()))
        try:
            await self.nodes_manager.initialize()
        except Exception as exc:  # no node answered: the next failure asks again
            log.warning("cluster_map_refresh_failed", error=str(exc))
        self._refreshed_at = time.monotonic()

    async def _determine_slot(self, command: str, *args: Any) -> int:
        if str(command).upper() not in _STREAM_READS:
            slot: int = await super()._determine_slot(command, *args)
            return slot
        words = [str(a).upper() for a in args]
        names = args[words.index("STREAMS") + 1 :] if "STREAMS" in words else ()
        slots = {self.keyslot(key) for key in names[: len(names) // 2]}
        if len(slots) != 1:
            raise RedisClusterException(f"{command}: the streams must share one slot: {args}")
        return slots.pop()


class _Pipeline(ClusterPipeline):
    """A cluster pipeline whose failures, like single commands', close nothing in use."""

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> Any:
        token = _IN_COMMAND.set(True)
        try:
            return await super().execute(raise_on_error, allow_redirections)
        except RuntimeError as exc:
            raise _closed_transport(exc) from exc
        finally:
            _IN_COMMAND.reset(token)


def _closed_transport(exc: RuntimeError) -> ConnectionError:
    """A pooled connection to a node that died, written to: uvloop raises ``RuntimeError``
    ("the handler is closed") where asyncio raises an ``OSError`` that redis-py turns into a
    ``ConnectionError``; callers retry Redis errors, so it becomes one (redis-py has already
    dropped the connection)."""
    return ConnectionError(f"connection to a Redis node lost: {exc}")
