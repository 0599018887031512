r"""RegMean, plain (shared initialisation) and "align, then merge".

Jin, Ren, Preotiuc-Pietro & Cheng, "Dataless Knowledge Fusion by Merging Weights of Language
Models", ICLR 2023.  The merge of one layer is :func:`neurofuse.approximation.regmean`.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from .._fusion_set import FusionSet
from ..approximation import InputGram, layer_rows, regmean
from ..errors import ConfigError, IncompatibleModelsError
from ._align import ALIGNMENTS, merge_inputs
from ._base import FusionMethod, register_method

__all__ = ["AlignedRegMean", "AlignedRegMeanOptions", "RegMean", "RegMeanOptions"]

#: most entries of input rows unfolded at once per layer (a conv's patches)
_ROWS_BUDGET = 1 << 22


@dataclasses.dataclass(frozen=True)
class RegMeanOptions:
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
    align : str
        ``"none"``: merge the models as they are (they share an initialisation, the paper's
        setting); ``"activations"``: first permute every model onto model 0 by Git Re-Basin
        activation matching; ``"weights"``: by weight matching.
    """

    alpha: float = 1.0
    bias: str = "average"
    align: str = "none"

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.bias not in ("fit", "average"):
            raise ConfigError(f"bias must be 'fit' or 'average', got {self.bias!r}")
        if self.align not in ALIGNMENTS:
            raise ConfigError(f"align must be one of {list(ALIGNMENTS)}, got {self.align!r}")


def _mergeable(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"
                                        and not isinstance(m.padding, str))


@register_method("regmean")
class RegMean(FusionMethod):
    r"""RegMean: every linear layer merged by regression on each model's own layer inputs.

    For every ``Linear`` and ``Conv2d`` (on unfolded patches) the merged weights minimise
    :math:`\sum_k \lVert X_k W^\top - X_k W_k^\top\rVert^2` over each model's own inputs
    :math:`X_k` on the fusion set, from the Gram matrices :math:`G_k = X_k^\top X_k` alone
    (:func:`neurofuse.approximation.regmean`; ``alpha`` shrinks their off-diagonal entries).
    Every other tensor (normalisation parameters and statistics, embeddings; biases with
    ``bias="average"``) is averaged.  RegMean assumes the models share an initialisation (the
    paper merges fine-tuned copies of one language model): ``align="none"`` merges them as they
    are, any architecture of identical shapes.  For independently initialised models use
    ``align="activations"`` (the registered ``regmean-aligned``) or ``align="weights"``: every
    model is first permuted onto model 0 (a function-preserving change of basis), then merged.

    After fusing, :attr:`groupings` holds (for leveled models), per hidden level, the ``[n, N n]``
    matrix with ``1/N`` at each model's neuron merged into fused neuron ``j``.

    References
    ----------
    Jin, X., Ren, X., Preotiuc-Pietro, D., & Cheng, P. (2023). Dataless Knowledge Fusion by
    Merging Weights of Language Models. ICLR 2023.
    """

    summary = "RegMean (Jin et al. 2023): per-layer least squares from Gram matrices; shared init, no alignment"
    Options = RegMeanOptions
    min_models = 2

    def _fuse(self, models: List[nn.Module], data: Optional[FusionSet]) -> nn.Module:
        assert data is not None
        nets, self.groupings = merge_inputs(models, data, self.options.align, self.name, seed=self.seed,
                                            device=str(self.device), batch_size=self.batch_size,
                                            memory_budget=self.memory_budget)
        layers = [n for n, m in nets[0].named_modules() if _mergeable(m)]
        if not layers:
            raise IncompatibleModelsError(f"{self.name!r} merges Linear and Conv2d layers; the models have none")
        grams = [self._grams(net, layers, data) for net in nets]
        states = [net.state_dict() for net in nets]
        merged: Dict[str, Tensor] = {}
        for key, v in states[0].items():
            merged[key] = (sum(s[key].double() for s in states) / len(states)).to(v.dtype) \
                if v.is_floating_point() else v.clone()
        fit_bias = self.options.bias == "fit"
        for name in layers:
            if any(name not in g for g in grams):
                continue  # never run on the fusion set: averaged
            layer = dict(nets[0].named_modules())[name]
            has_bias = fit_bias and layer.bias is not None
            weights = []
            for s in states:
                w = s[f"{name}.weight"].reshape(layer.weight.shape[0], -1)
                weights.append(torch.cat([w, s[f"{name}.bias"][:, None]], 1) if has_bias else w)
            w = regmean(weights, [g[name] for g in grams], self.options.alpha)
            wkey = f"{name}.weight"
            if has_bias:
                merged[f"{name}.bias"] = w[:, -1].to(merged[f"{name}.bias"].dtype)
                w = w[:, :-1]
            merged[wkey] = w.reshape(merged[wkey].shape).to(merged[wkey].dtype)
        fused = copy.deepcopy(nets[0])
        fused.load_state_dict(merged)
        return fused

    def _grams(self, net: nn.Module, layers: List[str], data: FusionSet) -> Dict[str, Tensor]:
        """The Gram matrix of every layer's input rows in ``net`` over the fusion set."""
        mods = dict(net.named_modules())
        stats = {name: InputGram() for name in layers}
        fit_bias = self.options.bias == "fit"

        def hook(name: str):  # type: ignore[no-untyped-def]
            layer = mods[name]

            def run(_m: nn.Module, inputs: tuple) -> None:
                u = inputs[0]
                per = max(1, layer_rows(layer, u[:1], fit_bias).numel())
                step = max(1, _ROWS_BUDGET // per)
                for i in range(0, u.shape[0], step):
                    stats[name].update(layer_rows(layer, u[i:i + step], fit_bias))
            return run

        handles = [mods[name].register_forward_pre_hook(hook(name)) for name in layers]
        try:
            with torch.no_grad():
                for xb, _ in data.batches(self.device):
                    net(xb)
        finally:
            for h in handles:
                h.remove()
        return {name: s.gram for name, s in stats.items() if not s.empty}


@dataclasses.dataclass(frozen=True)
class AlignedRegMeanOptions(RegMeanOptions):
    """Settings of :class:`AlignedRegMean` (:class:`RegMeanOptions`, aligned by default).

    Attributes
    ----------
    align : str
        ``"activations"`` (Git Re-Basin activation matching onto model 0, the default) or
        ``"weights"`` (weight matching, no data for the alignment).
    """

    align: str = "activations"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.align == "none":
            raise ConfigError("regmean-aligned aligns first: align must be 'activations' or 'weights' "
                              "(use method 'regmean' for models that share an initialisation)")


@register_method("regmean-aligned")
class AlignedRegMean(RegMean):
    """RegMean after aligning every model to model 0 ("align, then merge"): for independently
    initialised models of equal widths.  See :class:`RegMean`."""

    summary = "RegMean after Git Re-Basin alignment to model 0 (align, then merge): independent inits"
    Options = AlignedRegMeanOptions
