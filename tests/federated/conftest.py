"""Shared helpers of the federated tests: small trained MLPs and mocked Flower replies."""

from __future__ import annotations

from unittest.mock import Mock

import numpy as np
import pytest
import torch

pytest.importorskip("flwr", reason="neurofuse[federated] (flwr) is not installed")

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402

from neurofuse.federated import config_json, model_to_record  # noqa: E402
from neurofuse.models import MLP  # noqa: E402
from neurofuse.training import TrainConfig, train_model  # noqa: E402


def mock_reply(model=None, num_examples: int = 100, node: int = 1, label_counts=None, error: str = None,
               arrays=None, config=None):
    """A reply as a client sends it (Flower's own test pattern, ``create_mock_reply``)."""
    msg = Mock(spec=Message)
    msg.metadata.src_node_id = node
    if error is not None:
        msg.has_error.return_value = True
        msg.has_content.return_value = False
        msg.error.reason = error
        return msg
    cfg = ConfigRecord({"model": config_json(model), "partition-id": node} if config is None else config)
    if label_counts is not None:
        cfg["label-counts"] = [int(c) for c in label_counts]
    msg.content = RecordDict({"arrays": model_to_record(model) if arrays is None else arrays,
                              "metrics": MetricRecord({"num-examples": num_examples}), "config": cfg})
    msg.has_error.return_value = False
    msg.has_content.return_value = True
    return msg


@pytest.fixture(scope="session")
def client_mlps(digits):
    """Three MLPs of different widths trained on disjoint class-skewed parts of digits."""
    from neurofuse.federated import dirichlet_alpha_split

    y = digits.y_train.numpy()
    parts = dirichlet_alpha_split(y, 3, 0.5, seed=0)
    models = []
    for i, (part, hidden) in enumerate(zip(parts, ([32, 24], [40, 24], [32, 16]))):
        torch.manual_seed(10 + i)
        m = MLP(digits.input_shape, 10, hidden)
        train_model(m, digits.x_train[part], digits.y_train[part], config=TrainConfig(epochs=15, lr=3e-3, seed=i))
        models.append(m.eval())
    counts = [np.bincount(y[p], minlength=10) for p in parts]
    return models, parts, counts
