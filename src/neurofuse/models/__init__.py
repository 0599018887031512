"""The model zoo: every model knows its levels (``register_model`` / ``get_model`` / ``list_models``)."""

from ._registry import build_model, get_model, list_models, make_model, register_model, zoo_architectures
from .mlp import MLP
from .resnet import ResNet
from .vgg import VGG
from .vit import ViT

__all__ = ["MLP", "ResNet", "VGG", "ViT", "build_model", "get_model", "list_models", "make_model", "register_model",
           "zoo_architectures"]

from .ensemble import Ensemble  # noqa: E402  (registers the "ensemble" architecture)
from .multihead import MultiHead  # noqa: E402  (registers the "multihead" architecture)

__all__ += ["Ensemble", "MultiHead"]
