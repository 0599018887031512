r"""RegMean, plain (shared initialisation) and "align, then merge".

Jin, Ren, Preotiuc-Pietro & Cheng, "Dataless Knowledge Fusion by Merging Weights of Language
Models", ICLR 2023.  The merge of one layer is :func:`neurofuse.approximation.regmean`.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Dict, List, Sequence

import torch
from torch import Tensor, nn

from .._fusion_set import FusionSet
from ..approximation import LayerGrams, is_conv1d, layer_rows, regmean
from ..errors import IncompatibleModelsError
from ._memory import estimated_by, regmean_working_set
from ._base import FusionRun, register_method
from ._merge import AlignFirst, StatisticsMerge
from ._options import Interval, MethodOptions, OneOf, option

__all__ = ["AlignedRegMean", "AlignedRegMeanOptions", "RegMean", "RegMeanOptions"]

#: most entries of input rows unfolded at once per layer (a conv's patches)
_ROWS_BUDGET = 1 << 22


@dataclasses.dataclass(frozen=True)
class RegMeanOptions(MethodOptions):
    """Settings of :class:`RegMean`.

    Attributes
    ----------
    alpha : float
        Scale of the off-diagonal Gram entries (the paper's alpha, in [0, 1]): 1 is the exact
        least-squares merge, 0 a per-input weighted mean.
    bias : str
        ``"average"``: biases are averaged, as the paper does; ``"fit"``: a layer's bias is part
        of its least-squares fit (a ones column in the inputs).  The two were within noise of
        each other on held-out digits and MNIST splits (benchmarks/baselines_mlp.py --select).
    """

    alpha: float = option(1.0, Interval(float, 0, 1))
    bias: str = option("average", OneOf("average", "fit"))


def _mergeable(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or is_conv1d(m) or (
        isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str))


def merged_layers(net: nn.Module) -> List[str]:
    """Names of the layers RegMean merges by regression (``Linear``, GPT-2's ``Conv1D``,
    ungrouped zero-padded ``Conv2d``)."""
    return [n for n, m in net.named_modules() if _mergeable(m)]


@register_method("regmean")
@estimated_by(regmean_working_set)
class RegMean(StatisticsMerge):
    r"""RegMean: every linear layer merged by regression on each model's own layer inputs.

    For every ``Linear`` (and ``transformers``' ``Conv1D``, its weight stored transposed) and
    ``Conv2d`` (on unfolded patches) the merged weights minimise
    :math:`\sum_k \lVert X_k W^\top - X_k W_k^\top\rVert^2` over each model's own inputs
    :math:`X_k` on the fusion set, from the Gram matrices :math:`G_k = X_k^\top X_k` alone
    (:func:`neurofuse.approximation.regmean`; ``alpha`` shrinks their off-diagonal entries).
    Every other tensor (normalisation parameters and statistics, embeddings; biases with
    ``bias="average"``) is averaged.  RegMean assumes the models share an initialisation (the
    paper merges fine-tuned copies of one language model): ``regmean`` merges them as they are,
    any architecture of identical shapes.  For independently initialised models use
    ``regmean-aligned``: every model is first permuted onto model 0 (a function-preserving change
    of basis), then merged.  The Gram matrices are sums over samples, so a federated server
    merges from the sums its clients compute (:mod:`neurofuse.federated`).

    References
    ----------
    Jin, X., Ren, X., Preotiuc-Pietro, D., & Cheng, P. (2023). Dataless Knowledge Fusion by
    Merging Weights of Language Models. ICLR 2023.
    """

    summary = "RegMean (Jin et al. 2023): per-layer least squares from Gram matrices; shared init, no alignment"
    label = "RegMean"
    order = 12
    Options = RegMeanOptions
    ModelStats = LayerGrams

    def model_statistics(self, net: nn.Module, data: FusionSet) -> LayerGrams:
        """The Gram matrix of every merged layer's input rows in ``net`` over ``data``."""
        mods = dict(net.named_modules())
        layers = merged_layers(net)
        if not layers:
            raise IncompatibleModelsError(f"{self.name!r} merges Linear and Conv2d layers; the model has none")
        stats = LayerGrams(len(layers))
        fit_bias = self.options.bias == "fit"

        def hook(i: int, layer: nn.Module):  # type: ignore[no-untyped-def]
            def run(_m: nn.Module, inputs: tuple) -> None:
                u = inputs[0]
                per = max(1, layer_rows(layer, u[:1], fit_bias).numel())
                step = max(1, _ROWS_BUDGET // per)
                for s in range(0, u.shape[0], step):
                    stats.update(i, layer_rows(layer, u[s:s + step], fit_bias))
            return run

        handles = [mods[name].register_forward_pre_hook(hook(i, mods[name])) for i, name in enumerate(layers)]
        try:
            with torch.no_grad():
                for xb, _ in data.batches(self.device):
                    net(xb)
        finally:
            for h in handles:
                h.remove()
        return stats

    def merge(self, run: FusionRun, nets: Sequence[nn.Module], stats: Sequence[LayerGrams]) -> nn.Module:
        layers = merged_layers(nets[0])
        if not layers:
            raise IncompatibleModelsError(f"{self.name!r} merges Linear and Conv2d layers; the models have none")
        states = [net.state_dict() for net in nets]
        merged: Dict[str, Tensor] = {}
        for key, v in states[0].items():
            merged[key] = (sum(s[key].double() for s in states) / len(states)).to(v.dtype) \
                if v.is_floating_point() else v.clone()
        fit_bias = self.options.bias == "fit"
        mods = dict(nets[0].named_modules())
        for i, name in enumerate(layers):
            grams = [s.gram(i) for s in stats]
            if any(g is None for g in grams):
                continue  # never run on the data: averaged
            layer = mods[name]
            has_bias = fit_bias and layer.bias is not None
            weights = []
            stored_t = is_conv1d(layer)          # [in, out]: merged as its [out, in] transpose
            for s in states:
                w = s[f"{name}.weight"].T if stored_t else s[f"{name}.weight"].reshape(layer.weight.shape[0], -1)
                weights.append(torch.cat([w, s[f"{name}.bias"][:, None]], 1) if has_bias else w)
            w = regmean(weights, grams, self.options.alpha)  # type: ignore[arg-type]
            wkey = f"{name}.weight"
            if has_bias:
                merged[f"{name}.bias"] = w[:, -1].to(merged[f"{name}.bias"].dtype)
                w = w[:, :-1]
            merged[wkey] = (w.T if stored_t else w.reshape(merged[wkey].shape)).to(merged[wkey].dtype)
        fused = copy.deepcopy(nets[0])
        fused.load_state_dict(merged)
        return fused


@dataclasses.dataclass(frozen=True)
class AlignedRegMeanOptions(RegMeanOptions):
    """Settings of :class:`AlignedRegMean` (:class:`RegMeanOptions` and the alignment).

    Attributes
    ----------
    align : str
        ``"activations"`` (Git Re-Basin activation matching onto model 0 on the fusion set, the
        default) or ``"weights"`` (weight matching: no data for the alignment, so it also
        works from federated clients' statistics).
    """

    align: str = option("activations", OneOf("activations", "weights"))


@register_method("regmean-aligned")
class AlignedRegMean(AlignFirst, RegMean):
    """RegMean after aligning every model to model 0 ("align, then merge"): for independently
    initialised models of equal widths.  See :class:`RegMean`."""

    summary = "RegMean after Git Re-Basin alignment to model 0 (align, then merge): independent inits"
    label = "RegMean (aligned)"
    order = 54
    Options = AlignedRegMeanOptions
