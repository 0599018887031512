"""The neurofuse ``ClientApp``: a zoo model trained on the client's partition, and the answers
to the no-server-data protocol's queries."""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .._fusion_set import FusionSet
from ..models import make_model
from ..training import TrainConfig, train_model
from ._data import ClientSetup, client_data
from ._queries import answer_query
from ._records import config_json, model_from_records, model_to_record

__all__ = ["make_client_app", "partition_id"]

log = logging.getLogger("neurofuse")


def partition_id(context: Context) -> int:
    """The client's partition: ``node_config["partition-id"]`` (set by Flower's simulation)."""
    return int(context.node_config["partition-id"])  # type: ignore[arg-type]


def _initial_model(setup: ClientSetup, pid: int, arrays: ArrayRecord, config: ConfigRecord):
    if len(arrays) > 0:
        text = config.get("model")
        if not isinstance(text, str):  # same architecture as ours: load the weights into it
            text = config_json(make_model(setup.arch, setup.size, *_shape(setup)))
        return model_from_records(arrays, ConfigRecord({"model": text}), who="the server")
    torch.manual_seed(setup.seed * 1000 + pid)
    return make_model(setup.arch, setup.size, *_shape(setup))


def _shape(setup: ClientSetup):
    from ._data import _dataset

    ds = _dataset(setup.dataset, setup.data_dir)
    return ds.input_shape, ds.num_classes


def make_client_app(setup: ClientSetup, threads: Optional[int] = 1) -> ClientApp:
    """A ``ClientApp`` whose clients hold the partitions of ``setup``.

    ``train``: start from the model the server sent (its zoo config in ``config["model"]``; an
    empty record: the client's own initialisation), train ``config["local-epochs"]`` (default
    ``setup.epochs``) epochs on the partition, keep the best validation epoch, reply with the
    weights, ``num-examples``, and the zoo config, partition id and label counts.
    ``query.level_stats`` / ``query.importance_sums`` / ``query.model_stats``: the statistics of
    the no-server-data protocols over the client's training part
    (:func:`neurofuse.federated.answer_query`).
    """
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if threads:
            torch.set_num_threads(threads)
        pid = partition_id(context)
        x, y, xv, yv = client_data(setup, pid)
        config = msg.content.config_records.get("config", ConfigRecord())
        arrays = msg.content.array_records.get("arrays", ArrayRecord())
        model = _initial_model(setup, pid, arrays, config)
        epochs = int(config.get("local-epochs", setup.epochs))  # type: ignore[arg-type]
        rnd = int(config.get("server-round", 1))  # type: ignore[arg-type]
        tc = TrainConfig(epochs=epochs, lr=float(config.get("lr", setup.lr)),  # type: ignore[arg-type]
                         batch_size=setup.batch_size, seed=setup.seed * 1000 + pid + 7 * rnd)
        hist = train_model(model, x, y, xv if len(xv) else None, yv if len(yv) else None, config=tc)
        reply_cfg = ConfigRecord({"model": config_json(model), "partition-id": pid})
        if setup.share_label_counts:
            num_classes = int(getattr(model, "num_classes"))
            reply_cfg["label-counts"] = [int(c) for c in np.bincount(y.numpy(), minlength=num_classes)]
        metrics = MetricRecord({"num-examples": int(len(y)),
                                "val-accuracy": float(hist.get("best_val_accuracy") or 0.0)})
        return Message(RecordDict({"arrays": model_to_record(model), "metrics": metrics,
                                   "config": reply_cfg}), reply_to=msg)

    @app.query("level_stats")
    def level_stats(msg: Message, context: Context) -> Message:
        return _answer(msg, context)

    @app.query("importance_sums")
    def importance(msg: Message, context: Context) -> Message:
        return _answer(msg, context)

    @app.query("model_stats")
    def model_stats(msg: Message, context: Context) -> Message:
        return _answer(msg, context)

    def _answer(msg: Message, context: Context) -> Message:
        if threads:
            torch.set_num_threads(threads)
        x, y, _, _ = client_data(setup, partition_id(context))
        return Message(answer_query(msg, FusionSet(x, y, 256)), reply_to=msg)

    return app
