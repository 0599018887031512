"""An in-process grid: the same ServerApp and ClientApp logic as a Flower simulation, no Ray.

:class:`LocalGrid` implements Flower's ``Grid`` interface by calling a ``ClientApp`` directly,
one message after the other, with one persistent ``Context`` per node (``node_config`` holds
``partition-id`` and ``num-partitions``, as in Flower's simulation).  A client that raises
answers with an error reply, as a SuperNode does.  It starts in well under a second, so tests
and quick runs on small machines use it; :func:`neurofuse.federated.simulate` runs the real
Ray-backed simulation.
"""

from __future__ import annotations

import itertools
import logging
import traceback
from typing import Dict, Iterable, Optional

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

__all__ = ["LocalGrid"]

log = logging.getLogger("neurofuse")

#: node id of the server side, and of the first client (clients are numbered from it)
SERVER_NODE_ID = 1
FIRST_CLIENT_NODE_ID = 1001


class LocalGrid(Grid):
    """A Flower ``Grid`` whose ``num_clients`` nodes run ``client_app`` in this process.

    Parameters
    ----------
    client_app : flwr.clientapp.ClientApp
        The app every node runs.
    num_clients : int
        Number of nodes; node ``FIRST_CLIENT_NODE_ID + i`` has ``partition-id`` ``i``.
    run_id : int
        The run id messages carry.

    Notes
    -----
    Building a ``Message`` in flwr 1.42 needs the process's task identity
    (``flwr.supercore.task_identity.TaskIdentity``, an internal API: neurofuse pins flwr 1.42);
    the grid sets it as Flower's own ServerApp runtime does.
    """

    def __init__(self, client_app: ClientApp, num_clients: int, run_id: int = 1) -> None:
        self.client_app = client_app
        self._run = Run.create_empty(run_id)
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SERVER_NODE_ID
        TaskIdentity.task_id = 1
        self.contexts: Dict[int, Context] = {
            FIRST_CLIENT_NODE_ID + i: Context(run_id=run_id, node_id=FIRST_CLIENT_NODE_ID + i,
                                              node_config={"partition-id": i, "num-partitions": num_clients},
                                              state=RecordDict(), run_config={})
            for i in range(num_clients)}
        self._ids = itertools.count(1)
        self._pending: Dict[str, Message] = {}
        #: node ids that fail every message (tests of dropped clients)
        self.failing: set = set()

    # -- Grid interface -----------------------------------------------------------------------
    def set_run(self, run: Run) -> None:  # type: ignore[override]
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: Optional[float] = None) -> Message:
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id,
                       group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            mid = f"local-{next(self._ids)}"
            msg.metadata.__dict__["_message_id"] = mid
            self._pending[mid] = msg
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._deliver(self._pending.pop(mid)) for mid in list(message_ids) if mid in self._pending]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: Optional[float] = None) -> Iterable[Message]:
        return list(self.pull_messages(self.push_messages(messages)))

    # -- delivery -----------------------------------------------------------------------------
    def _deliver(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        context = self.contexts.get(node)
        if context is None:
            return Message(Error(code=404, reason=f"no node {node}"), reply_to=msg)
        if node in self.failing:
            return Message(Error(code=500, reason="node marked as failing"), reply_to=msg)
        try:
            return self.client_app(msg, context)
        except Exception as exc:  # a failing client answers with an error, as a SuperNode does
            log.debug("client node %d raised: %s", node, traceback.format_exc())
            return Message(Error(code=500, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
