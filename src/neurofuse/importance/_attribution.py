r"""Layer attributions for every level of a model from one set of passes.

The per-level way (one captum ``LayerConductance`` / ``LayerDeepLift`` run per level) repeats
the same forward and backward passes once per level.  Both algorithms only need, at the output
:math:`h^{(l)}` of each level, the level's value and the gradient of the target logit with
respect to it, and one backward pass gives the gradients at every level output at once.  This
module hooks every level output, runs the passes once and forms the attributions of all levels
exactly as captum 0.9 forms them for one layer (same inputs, same batches, same arithmetic, so a
float32 model gets the same numbers as captum's per-layer result).

Conductance (Dhamdhere et al. 2018), as captum's ``LayerConductance`` with the zero baseline: for
the ``K = n_steps + 1`` points :math:`\alpha_0 < \dots < \alpha_{K-1}` of the Gauss-Legendre rule
on :math:`[0, 1]` (``approximation_parameters("gausslegendre")``),

.. math::  \mathrm{cond}^{(l)} = \sum_{k=0}^{K-2}
           \bigl(h^{(l)}(\alpha_{k+1} x) - h^{(l)}(\alpha_k x)\bigr)\odot
           \frac{\partial F_y}{\partial h^{(l)}}(\alpha_k x),

so one forward and one backward pass at each :math:`\alpha_k` serve every level.

DeepLIFT with the rescale rule (Shrikumar et al. 2017), as captum's ``LayerDeepLift`` with the zero
baseline and ``multiply_by_inputs=True``: inputs and baselines run as one batch ``[x; 0]``, every
module whose type is a key of :data:`RESCALE_RULES` replaces the gradient at its input by captum's
multiplier rule, and

.. math::  \mathrm{dl}^{(l)} = \bigl(h^{(l)}(x) - h^{(l)}(0)\bigr)\odot m^{(l)},

with :math:`m^{(l)}` the modified gradient at the level output for the input half of the batch.
The rule hooks are built as captum builds them (a tensor hook on each module's input that rewrites
the gradient, a tensor hook on its output that records the incoming gradient, registered in the
same order), so the results match captum also where its hook order matters (a max-pool right after
a ReLU: the ReLU's rule sees the gradient before the max-pool rule rewrites it).

References
----------
Dhamdhere, Sundararajan, Yan, "How important is a neuron?", arXiv:1805.12233, 2018.
Shrikumar, Greenside, Kundaje, "Learning important features through propagating activation
differences", ICML 2017.
Ancona, Ceolini, Öztireli, Gross, "Towards better understanding of gradient-based attribution
methods for deep neural networks", ICLR 2018 (the gradient form of DeepLIFT that captum uses).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = [
    "DEEPLIFT_EPS",
    "LevelOutputIsRuleOutput",
    "RESCALE_RULES",
    "conductance_batch",
    "deeplift_batch",
    "deeplift_needs_fallback",
    "gauss_legendre_alphas",
]

#: DeepLIFT's ``eps`` in captum: where ``|delta_in| < eps`` the plain gradient is kept
DEEPLIFT_EPS = 1e-10


def gauss_legendre_alphas(n: int) -> List[float]:
    """The ``n`` Gauss-Legendre points on ``[0, 1]``, ascending (captum's ``gausslegendre``)."""
    return (0.5 * (1.0 + np.polynomial.legendre.leggauss(n)[0])).tolist()


def _select(out: Tensor, target: Tensor) -> Tensor:
    """The target logit of every row (captum's ``_select_targets`` for a tensor target)."""
    if target.numel() == 1:
        return out[:, int(target.item())]
    return torch.gather(out, 1, target.reshape(len(out), 1)).squeeze(-1)


@contextlib.contextmanager
def _level_outputs(model: nn.Module,
                   level_modules: Sequence[nn.Module]) -> Iterator[List[Optional[Tensor]]]:
    """Record the output of each of ``level_modules``; the forward goes on with a clone.

    Cloning is what captum's layer hook does (an in-place op further on cannot change the recorded
    value); the gradient at the recorded tensor is the gradient at the level output.
    """
    saved: List[Optional[Tensor]] = [None] * len(level_modules)
    handles: List[RemovableHandle] = []

    def hook_for(i: int) -> Callable[..., Tensor]:
        def hook(module: nn.Module, inp: object, out: Tensor) -> Tensor:
            if not isinstance(out, Tensor):
                raise TypeError(f"level {type(module).__name__} returns a "
                                f"{type(out).__name__}, not a tensor")
            if saved[i] is not None:
                raise RuntimeError(f"level module {type(module).__name__} ran twice in one forward pass")
            saved[i] = out
            return out.clone()

        return hook

    try:
        for i, m in enumerate(level_modules):
            handles.append(m.register_forward_hook(hook_for(i)))
        yield saved
    finally:
        for h in handles:
            h.remove()


def _grads(target_sum: Tensor, saved: Sequence[Optional[Tensor]]) -> List[Tensor]:
    """Gradients of ``target_sum`` at every recorded level output, from one backward pass."""
    outs = list(saved)
    if any(s is None for s in outs):
        raise RuntimeError("a level did not run in the model's forward pass")
    grads = torch.autograd.grad(target_sum, outs, allow_unused=True)  # type: ignore[arg-type]
    return [torch.zeros_like(o) if g is None else g for o, g in zip(outs, grads)]  # type: ignore[arg-type]


# -- conductance ------------------------------------------------------------------------------
def conductance_batch(model: nn.Module, level_modules: Sequence[nn.Module], x: Tensor, y: Tensor,
                      n_steps: int = 10, alphas_per_pass: Optional[int] = None) -> List[Tensor]:
    r"""Layer conductance of one batch at the output of each of ``level_modules``.

    Parameters
    ----------
    model : nn.Module
        The model (in eval mode); its forward must run each of ``level_modules`` once.
    level_modules : sequence of nn.Module
        The modules whose outputs are attributed.
    x : Tensor
        Inputs ``[B, ...]``; the baseline is zero.
    y : Tensor
        Target class of every row ``[B]``.
    n_steps : int
        captum's ``n_steps``: ``n_steps + 1`` Gauss-Legendre points, ``n_steps`` products.
    alphas_per_pass : int, optional
        How many integration points run as one batch; ``None`` runs all of them in one batch of
        ``(n_steps + 1) * B`` rows, as captum does (identical arithmetic).  Smaller values need
        less memory; a pass holding only the last point runs without a backward.

    Returns
    -------
    list of Tensor
        Per level, the attribution ``[B, *level_output_shape]`` in the model's dtype (what
        ``LayerConductance(model, layer).attribute(x, target=y, n_steps=n_steps)`` returns).
    """
    b = x.shape[0]
    alphas = gauss_legendre_alphas(n_steps + 1)
    k_all = len(alphas)
    chunk = k_all if alphas_per_pass is None else max(1, int(alphas_per_pass))
    attrs: List[Optional[Tensor]] = [None] * len(level_modules)
    prev_eval: List[Optional[Tensor]] = [None] * len(level_modules)
    prev_grad: List[Optional[Tensor]] = [None] * len(level_modules)
    for start in range(0, k_all, chunk):
        idx = list(range(start, min(k_all, start + chunk)))
        # captum: baseline + alpha * (input - baseline), baseline the integer 0
        scaled = torch.cat([0 + alphas[k] * (x - 0) for k in idx], dim=0)
        needs_grad = idx[0] < k_all - 1   # the last point's gradient is never used
        with torch.set_grad_enabled(needs_grad), _level_outputs(model, level_modules) as saved:
            if needs_grad:
                scaled.requires_grad_()
            out = model(scaled)
            target = y if y.numel() == 1 else torch.cat([y] * len(idx), dim=0)
            if needs_grad:
                grads = _grads(_select(out, target).sum(), saved)
            evals = [s.detach() for s in saved]  # type: ignore[union-attr]
        for li, ev in enumerate(evals):
            # rows of consecutive points: the previous pass's last point, then this pass's points
            pe, pg = prev_eval[li], prev_grad[li]
            e_all = ev if pe is None else torch.cat([pe, ev], dim=0)
            g_all: Optional[Tensor] = pg
            if needs_grad:
                g_all = grads[li] if pg is None else torch.cat([pg, grads[li]], dim=0)
            n_pairs = e_all.shape[0] // b - 1
            if n_pairs > 0:
                assert g_all is not None
                # captum: (eval[k+1] - eval[k]) * grad[k], summed over the steps
                prod = (e_all[b:] - e_all[:-b]) * g_all[:n_pairs * b]
                part = torch.sum(prod.reshape((n_pairs, b) + tuple(ev.shape[1:])), dim=0)
                attrs[li] = part if attrs[li] is None else attrs[li] + part
            prev_eval[li] = e_all[-b:]
            prev_grad[li] = g_all[-b:] if g_all is not None else None
    return [a for a in attrs if a is not None]


# -- DeepLIFT (rescale) ---------------------------------------------------------------------------
class _RuleState:
    """What one module's rule needs: its input and output in the forward, the gradient at its output."""

    __slots__ = ("input", "output", "grad_out", "calls")

    def __init__(self) -> None:
        self.input: Optional[Tensor] = None
        self.output: Optional[Tensor] = None
        self.grad_out: Optional[Tensor] = None
        self.calls = 0


def _diffs(inp: Tensor, out: Tensor) -> Tuple[Tensor, Tensor]:
    """``(x - x_ref, y - y_ref)``, each repeated for both halves of the ``[inputs; baselines]`` batch."""
    x, x_ref = inp.chunk(2)
    o, o_ref = out.chunk(2)
    return torch.cat(2 * [x - x_ref]), torch.cat(2 * [o - o_ref])


def _rescale(module: nn.Module, st: _RuleState, grad_in: Tensor, eps: float) -> Tensor:
    """Rescale rule of an elementwise non-linearity: ``grad_out * delta_out / delta_in``."""
    d_in, d_out = _diffs(st.input, st.output)  # type: ignore[arg-type]
    return torch.where(d_in.abs() < eps, grad_in, st.grad_out * d_out / d_in)  # type: ignore[operator]


def _softmax_rule(module: nn.Module, st: _RuleState, grad_in: Tensor, eps: float) -> Tensor:
    """captum's softmax rule: the rescale multipliers minus their mean over the whole batch tensor."""
    d_in, d_out = _diffs(st.input, st.output)  # type: ignore[arg-type]
    unnorm = torch.where(d_in.abs() < eps, grad_in, st.grad_out * d_out / d_in)  # type: ignore[operator]
    n = grad_in.numel()
    return unnorm - unnorm.sum() * 1 / n


def _maxpool_rule(pool: Callable[..., Tuple[Tensor, Tensor]], unpool: Callable[..., Tensor]
                  ) -> Callable[[nn.Module, _RuleState, Tensor, float], Tensor]:
    def rule(module: nn.Module, st: _RuleState, grad_in: Tensor, eps: float) -> Tensor:
        m: nn.Module = module
        inp, out = st.input, st.output
        assert inp is not None and out is not None and st.grad_out is not None
        with torch.no_grad():
            x, x_ref = inp.chunk(2)
            o, o_ref = out.chunk(2)
            d_in = torch.cat(2 * [x - x_ref])
            # the cross maximum of the two halves' pooled outputs (captum's maxpool rule)
            o_max = torch.max(o, o_ref)
            d_out = torch.cat([o_max - o_ref, o - o_max])
            _, indices = pool(inp, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, True)
            spread = unpool(st.grad_out * d_out, indices, m.kernel_size, m.stride, m.padding,
                            list(inp.shape))
            a, b = torch.chunk(spread, 2)
        summed = a + b
        summed = torch.cat(2 * [summed])
        # captum keeps grad_input[0] (the first row's gradient, broadcast) where delta_in ~ 0
        return torch.where(d_in.abs() < eps, grad_in[0], summed / d_in)

    return rule


#: module type -> rescale rule, the same table as captum's ``SUPPORTED_NON_LINEAR`` (exact types)
RESCALE_RULES: Dict[type, Callable[[nn.Module, _RuleState, Tensor, float], Tensor]] = {
    nn.ReLU: _rescale,
    nn.ELU: _rescale,
    nn.LeakyReLU: _rescale,
    nn.Sigmoid: _rescale,
    nn.Tanh: _rescale,
    nn.Softplus: _rescale,
    nn.MaxPool1d: _maxpool_rule(F.max_pool1d, F.max_unpool1d),  # type: ignore[arg-type]
    nn.MaxPool2d: _maxpool_rule(F.max_pool2d, F.max_unpool2d),  # type: ignore[arg-type]
    nn.MaxPool3d: _maxpool_rule(F.max_pool3d, F.max_unpool3d),  # type: ignore[arg-type]
    nn.Softmax: _softmax_rule,
}


def _rule_modules(model: nn.Module) -> List[nn.Module]:
    """Modules that get a rescale rule, chosen as captum chooses them (exact type in the table,
    not a container, no module backward hook of their own)."""
    return [m for m in model.modules()
            if type(m) in RESCALE_RULES and "nn.modules.container" not in str(type(m))
            and len(m._backward_hooks) == 0]


def deeplift_needs_fallback(model: nn.Module, level_modules: Sequence[nn.Module]) -> bool:
    """Whether a level module is itself a rule module (captum then drops its rule for that level
    only, so one shared pass cannot reproduce every level)."""
    rules = {id(m) for m in _rule_modules(model)}
    return any(id(m) in rules for m in level_modules)


class LevelOutputIsRuleOutput(RuntimeError):
    """A level ends with a rule module: the recorded level output is also that module's output."""


@contextlib.contextmanager
def _rescale_hooks(model: nn.Module, eps: float) -> Iterator[List[Tensor]]:
    """Install the rescale rule on every rule module; yields the list of the rule modules' outputs."""
    handles: List[RemovableHandle] = []
    rule_outputs: List[Tensor] = []

    def install(m: nn.Module) -> None:
        st = _RuleState()
        rule = RESCALE_RULES[type(m)]

        def pre_hook(module: nn.Module, args: Tuple[Tensor, ...]) -> Optional[Tensor]:
            st.calls += 1
            if st.calls > 1:
                raise RuntimeError(
                    f"DeepLIFT: module {module} runs more than once in the forward pass; the "
                    "rescale rule needs every non-linearity to be used once (as in captum)")
            x = args[0]
            st.input = x.clone().detach()
            if not x.requires_grad:
                return None

            def input_grad_hook(g: Tensor) -> Optional[Tensor]:
                if st.grad_out is None:
                    return None
                return rule(module, st, g, eps)

            x.register_hook(input_grad_hook)
            return x.clone()

        def fwd_hook(module: nn.Module, args: Tuple[Tensor, ...], out: Tensor) -> None:
            st.output = out.clone().detach()
            rule_outputs.append(out)
            if out.requires_grad:
                def output_grad_hook(g: Tensor) -> None:
                    st.grad_out = g

                out.register_hook(output_grad_hook)

        handles.append(m.register_forward_pre_hook(pre_hook))
        handles.append(m.register_forward_hook(fwd_hook))

    try:
        for m in _rule_modules(model):
            install(m)
        yield rule_outputs
    finally:
        for h in handles:
            h.remove()


def deeplift_batch(model: nn.Module, level_modules: Sequence[nn.Module], x: Tensor, y: Tensor,
                   eps: float = DEEPLIFT_EPS) -> List[Tensor]:
    r"""DeepLIFT (rescale rule, zero baseline) of one batch at the output of each level module.

    Parameters
    ----------
    model : nn.Module
        The model (in eval mode); its forward must run each of ``level_modules`` once.
    level_modules : sequence of nn.Module
        The modules whose outputs are attributed; none may be a rule module itself
        (see :func:`deeplift_needs_fallback`).
    x : Tensor
        Inputs ``[B, ...]``.
    y : Tensor
        Target class of every row ``[B]``.
    eps : float
        Below this ``|delta_in|`` a rule keeps the plain gradient (captum's default ``1e-10``).

    Returns
    -------
    list of Tensor
        Per level, ``(h(x) - h(0)) * multiplier`` ``[B, *level_output_shape]`` in the model's dtype
        (what ``LayerDeepLift(model, layer).attribute(x, target=y)`` returns).

    Raises
    ------
    LevelOutputIsRuleOutput
        If a level's output is the output of a rule module (then captum's results depend on which
        single layer it hooks; the caller falls back to captum per level).
    """
    both = torch.cat([x, torch.full_like(x, 0)])
    target = y if y.numel() == 1 else torch.cat([y] * 2, dim=0)
    with torch.enable_grad(), _rescale_hooks(model, eps) as rule_outputs, \
            _level_outputs(model, level_modules) as saved:
        both.requires_grad_()
        out = model(both)
        if any(s is r for s in saved for r in rule_outputs):
            raise LevelOutputIsRuleOutput("a level output is the output of a rescale-rule module")
        grads = _grads(_select(out, target).sum(), saved)
        evals = [s.detach() for s in saved]  # type: ignore[union-attr]
    attrs = []
    for ev, g in zip(evals, grads):
        h_in, h_ref = ev.chunk(2)
        attrs.append((h_in - h_ref) * g.chunk(2)[0])
    return attrs
