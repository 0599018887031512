"""Models and statistics as Flower records, and the checks a server makes on what it receives."""

from __future__ import annotations

import json
import math
from typing import Callable, Dict, Mapping, Optional, Sequence

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from torch import Tensor, nn

from ..errors import IncompatibleModelsError
from ..models import build_model

__all__ = [
    "ModelFactory",
    "client_name",
    "config_json",
    "model_from_records",
    "model_to_record",
    "record_bytes",
    "state_from_record",
    "state_to_record",
]

#: builds an (untrained) client model from the ``ConfigRecord`` a client sent
ModelFactory = Callable[[ConfigRecord], nn.Module]


def config_json(model: nn.Module) -> str:
    """The zoo architecture description of ``model`` (``model.config()``) as a JSON string."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise IncompatibleModelsError(
            f"a {type(model).__name__} does not describe its architecture (no .config()); "
            "use a zoo model or give the strategy a model_factory"
        )
    return json.dumps(cfg(), sort_keys=True)


def model_to_record(model: nn.Module) -> ArrayRecord:
    """Every parameter and buffer of ``model`` (its ``state_dict``) as an ``ArrayRecord``."""
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})


def state_to_record(state: Mapping[str, Tensor], prefix: str = "") -> ArrayRecord:
    """Tensors (e.g. :meth:`neurofuse.stats.AdditiveStats.state`) as an ``ArrayRecord``."""
    return ArrayRecord({prefix + k: torch.as_tensor(v).detach().cpu().contiguous() for k, v in state.items()})


def state_from_record(record: ArrayRecord, prefix: str = "") -> Dict[str, Tensor]:
    """The tensors of ``record`` whose keys start with ``prefix`` (prefix removed)."""
    return {k[len(prefix):]: v for k, v in record.to_torch_state_dict().items() if k.startswith(prefix)}


def model_from_records(arrays: ArrayRecord, config: Optional[ConfigRecord],
                       factory: Optional[ModelFactory] = None, who: str = "the client") -> nn.Module:
    """Rebuild a model from its weights and the zoo config ``config["model"]`` (or ``factory``).

    Raises
    ------
    IncompatibleModelsError
        Naming ``who``, if no architecture is given, the config does not build, the weights do
        not fit it (missing, unexpected or mis-shaped tensors) or a weight is NaN or infinite.
    """
    try:
        if factory is not None:
            model = factory(config if config is not None else ConfigRecord())
        else:
            text = None if config is None else config.get("model")
            if not isinstance(text, str):
                raise IncompatibleModelsError(
                    f"{who} sent no architecture (a ConfigRecord 'model' with the zoo config "
                    "JSON); send one or give the strategy a model_factory")
            model = build_model(json.loads(text))
    except IncompatibleModelsError:
        raise
    except Exception as exc:  # a bad config can fail in many ways; name the client
        raise IncompatibleModelsError(f"{who} sent an architecture that does not build: {exc}") from None
    state = arrays.to_torch_state_dict()
    ref = model.state_dict()
    missing = sorted(set(ref) - set(state))
    extra = sorted(set(state) - set(ref))
    if missing or extra:
        raise IncompatibleModelsError(
            f"{who}'s weights do not fit its architecture: missing {missing[:3]}, unexpected "
            f"{extra[:3]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(ref[k].shape):
            raise IncompatibleModelsError(
                f"{who}'s weight {k!r} has shape {list(v.shape)} but its architecture needs "
                f"{list(ref[k].shape)}")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise IncompatibleModelsError(f"{who} sent NaN or infinite values in {k!r}")
    model.load_state_dict({k: v.to(ref[k].dtype) for k, v in state.items()})
    return model.eval()


def _config_bytes(record: ConfigRecord) -> int:
    total = 0
    for k, v in record.items():
        total += len(k)
        if isinstance(v, (bytes, str)):
            total += len(v)
        elif isinstance(v, list):
            total += 8 * len(v)
        else:
            total += 8
    return total


def record_bytes(content: RecordDict) -> int:
    """Bytes of a message's content: array data (Flower's ``count_bytes``) plus config and
    metric values (8 bytes a number, the length of a string)."""
    total = 0
    for key, rec in content.items():
        if isinstance(rec, ArrayRecord):
            total += rec.count_bytes()
        elif isinstance(rec, (ConfigRecord, MetricRecord)):
            total += _config_bytes(rec)  # type: ignore[arg-type]
    return total


def client_name(msg: Message) -> str:
    """How warnings name a client: its node id and, if it said so, its partition."""
    node = msg.metadata.src_node_id
    part = None
    if msg.has_content():
        cfg = msg.content.config_records.get("config")
        if cfg is not None:
            part = cfg.get("partition-id")
    return f"client node {node}" + (f" (partition {part})" if part is not None else "")


def finite(values: Sequence[float]) -> bool:
    return all(math.isfinite(float(v)) for v in values)
