"""A client's answer to any query of the no-server-data protocols (one entry point for the ClientApp)."""

from __future__ import annotations

from flwr.app import Message, RecordDict

from .._fusion_set import FusionSet
from ._levels import answer_level_query
from ._merge import MODEL_STATS_QUERY, answer_model_stats

__all__ = ["answer_query"]


def answer_query(message: Message, data: FusionSet) -> RecordDict:
    """A client's reply to a protocol query, computed on its own ``data`` (which never leaves).

    ``query.level_stats`` / ``query.importance_sums``: the level-wise protocol's statistics
    (:func:`neurofuse.federated.fuse_by_levels`); ``query.model_stats``: every model's statistics
    for a merge (:func:`neurofuse.federated.merge_by_statistics`).
    """
    if message.metadata.message_type == MODEL_STATS_QUERY:
        return answer_model_stats(message, data)
    return answer_level_query(message, data)
