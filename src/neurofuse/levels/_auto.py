r"""Automatic levels: cut an ordinary PyTorch model into levels without a declaration.

:func:`auto_levels` (``neurofuse.levels_from(model, input_shape=...)`` with no ``levels``) traces
the model with ``torch.fx`` symbolic tracing and cuts its graph where **one tensor separates the
graph** (every later operation depends on the input only through it) and that tensor is a
*pre-activation*: the output of a ``Linear``/``Conv`` layer, of a normalisation that directly
follows one (``Conv -> BatchNorm`` is one level, as the zoo's ``[Conv, BN]`` stem), the sum
that closes a skip connection, or the ``torch.cat`` of parallel branches along the neuron axis.
Everything between two cuts is one level, so a residual block, an attention block or any
sub-graph with a skip connection stays whole: the tensors inside it are never the only live
value.  The paper's levels end at pre-activations (section 3); the non-linearity that follows
starts the next level.  The model is traced as ``model(x)`` runs: forward arguments with
defaults are specialised to them (``concrete_args``).

Each level is built in the form the fusion methods read:

* a **chain** (every layer with parameters reads the previous layer's output alone) becomes an
  ``nn.Sequential`` of the model's own layers, with the parameter-free operations between them
  as small ``torch.fx`` modules (:class:`Glue`, which says when it is an eval-mode identity, an
  element-wise activation or a softmax head);
* a **residual block** (a parameter-free prefix, then two chains joined by ``+``) becomes a
  :class:`AutoBlock` with ``branch`` and ``shortcut`` (an ``nn.Identity`` shortcut for an identity
  skip), the residual-stream convention of :mod:`neurofuse.levels._layout`;
* a **concatenation** (a parameter-free prefix, then chains joined by ``torch.cat``) becomes a
  :class:`AutoConcat` with ``branches`` (an ``nn.Identity`` for a part that is the level input);
* anything else (attention, several paths, parameters used directly such as a CLS token) becomes
  a ``torch.fx.GraphModule`` of the sub-graph, which only ``kf-gradient`` fits.

Which method fuses which kind is asked of the methods (:func:`neurofuse.levels.affine_reason`,
:func:`neurofuse.levels.alignment_reason`).

When ``torch.fx`` cannot trace the model (data-dependent control flow), the order in which its
leaf modules run is recorded with forward hooks instead (logged as a warning); that sees only
modules, so it works for models whose ``forward`` is a chain of modules.  Either way the levels
are checked against the model's own ``forward`` on a random input, like declared levels.

The approach follows the graph-capture tools surveyed in ``flower-scale-levels.md`` §3.2 (PLeaS:
``torch.fx`` tracing; rebasin/torchview: module order); the level cut at separating tensors is
neurofuse's own.
"""

from __future__ import annotations

import copy
import inspect
import logging
import operator
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, IncompatibleModelsError
from ._core import ELEMENTWISE
from ._transformer import affixed_block, block_stages
from ._wrapped import DeclaredNet, check_input_shape, check_not_shared

__all__ = ["AutoBlock", "AutoConcat", "AutoGraph", "AutoNet", "Glue", "auto_levels", "is_eval_identity"]

log = logging.getLogger("neurofuse")

_AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
         nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
            nn.FeatureAlphaDropout)
_ADD_FUNCS = {operator.add, operator.iadd, torch.add}
_CAT_FUNCS = {torch.cat, torch.concat, torch.concatenate}
_EVAL_IDENTITY_FUNCS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                        F.feature_alpha_dropout, torch.dropout}
_AXIS_OF_DIM = {2: "dense", 4: "conv", 3: "token"}


def is_eval_identity(module: nn.Module) -> bool:
    """Whether ``module`` is the identity in eval mode (``Dropout`` and friends, a plain
    ``nn.Identity``, or a :class:`Glue` of such operations)."""
    from ._core import _is_eval_identity

    return _is_eval_identity(module)


class AutoBlock(nn.Module):
    """A residual level found by :func:`auto_levels`: ``branch(pre(x)) + shortcut(pre(x))``.

    ``pre`` holds no parameters (the activation that starts the level, a pool); ``shortcut`` is
    an ``nn.Identity`` for an identity skip.  This is the block protocol of
    :func:`neurofuse.levels._layout.level_layout` (attributes ``branch`` and ``shortcut``), so the
    alignment methods handle it like the zoo's ResNet blocks.
    """

    def __init__(self, pre: nn.Module, branch: nn.Module, shortcut: nn.Module) -> None:
        super().__init__()
        self.pre = pre
        self.branch = branch
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        h = self.pre(x)
        return self.branch(h) + self.shortcut(h)


class AutoConcat(nn.Module):
    """A concatenation level found by :func:`auto_levels`: ``cat([b(pre(x)) for b in branches], dim)``
    along the neuron axis (Inception-style parallel branches, a DenseNet layer's
    ``cat([x, f(x)])``).

    ``pre`` holds no parameters; every branch is a chain of the model's own layers, or an
    ``nn.Identity`` for a branch that passes the level input on.  The level's output neurons are
    the concatenation of its branches' (its *parts*): the alignment methods give each part its
    own map and the map of the output is their block diagonal; the closed form groups and fits
    each part on its own (:func:`neurofuse.levels._layout.level_layout`).
    """

    def __init__(self, pre: nn.Module, branches: Sequence[nn.Module], dim: int) -> None:
        super().__init__()
        self.pre = pre
        self.branches = nn.ModuleList(branches)
        self.dim = int(dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.pre(x)
        return torch.cat([b(h) for b in self.branches], dim=self.dim)


class Glue(nn.Module):
    """Parameter-free operations between two layers of a chain (a traced ``torch.fx`` sub-graph).

    ``eval_identity`` is true when they are all identities in eval mode (dropout), so that
    :func:`~neurofuse.levels.split_affine` ignores them at the end of a level; ``monotone_head``
    when they are a softmax or log-softmax over the neurons (and such identities): at the end of
    a model they do not change its prediction, so the closed form fits the logits before them;
    ``elementwise`` when they are element-wise activations (and such identities).
    """

    def __init__(self, ops: fx.GraphModule, eval_identity: bool = False, monotone_head: bool = False,
                 elementwise: bool = False) -> None:
        super().__init__()
        self.ops = ops
        self.eval_identity = bool(eval_identity)
        self.monotone_head = bool(monotone_head)
        self.elementwise = bool(elementwise)

    def forward(self, x: Tensor) -> Tensor:
        return self.ops(x)


class AutoGraph(nn.Module):
    """A level that is neither a chain nor a residual block (attention, several paths, direct
    parameters): the traced sub-graph, fitted by ``kf-gradient`` only.

    ``not_alignable`` says why; :func:`neurofuse.levels._layout.level_layout` refuses the level
    with it.
    """

    def __init__(self, graph: fx.GraphModule, not_alignable: str) -> None:
        super().__init__()
        self.graph = graph
        self.not_alignable = not_alignable

    def forward(self, x: Tensor) -> Tensor:
        return self.graph(x)


class AutoNet(DeclaredNet):
    """A user model seen through its automatic levels (built by :func:`auto_levels`).

    Like :class:`~neurofuse.levels.DeclaredNet` the levels share the model's modules.

    Attributes
    ----------
    kinds : list of str
        ``"chain"``, ``"block"`` or ``"graph"`` per level (see the module docstring).
    tracer : str
        ``"fx"`` or ``"hooks"`` (the forward-hook fallback).
    model_keys : dict
        This net's state-dict keys -> the original model's state-dict keys.
    """

    arch = "auto"

    def __init__(self, levels: Sequence[nn.Module], axes: Sequence[str], input_shape: Sequence[int],
                 num_classes: int, names: Sequence[str], source: str, kinds: Sequence[str],
                 tracer: str, model_keys: Dict[str, str]) -> None:
        super().__init__(levels, axes, input_shape, num_classes, names, source)
        self.kinds: List[str] = list(kinds)
        self.tracer = tracer
        self.model_keys: Dict[str, str] = dict(model_keys)

    def extra_repr(self) -> str:
        return f"source={self.source}, tracer={self.tracer}, kinds={self.kinds}, axes={self.axes}"

    def model_state_dict(self, fused: Optional[nn.Module] = None) -> Dict[str, Tensor]:
        """The original model's state dict, with the values of ``fused`` (default: this net).

        ``fused`` is a model returned by a fusion method for inputs built from this net (same
        levels and widths).  When a closed-form method folded a ``BatchNorm`` into the layer
        before it, the layer gets the folded weights and the BatchNorm becomes the identity
        (weight 1, running mean 0, running variance ``1 - eps``, bias: the folded bias when the
        layer has none), which computes the fused function in eval mode.

        Raises
        ------
        IncompatibleModelsError
            If ``fused`` does not have this net's levels (e.g. another width).
        """
        src = self if fused is None else fused
        state = {k: v.detach().clone() for k, v in src.state_dict().items()}
        out: Dict[str, Tensor] = {}
        for key, mkey in self.model_keys.items():
            if key in state:
                out[mkey] = state[key]
        if fused is not None and isinstance(fused, nn.Module) and hasattr(fused, "levels"):
            for i, (mine, theirs) in enumerate(zip(self.levels, fused.levels)):
                _unfold_level(self, i, mine, theirs, out)
        ref = {k: v for k, v in self.state_dict().items()}
        for key, mkey in self.model_keys.items():
            if mkey not in out:
                raise IncompatibleModelsError(
                    f"the fused model has no tensor for {mkey!r} (level key {key!r}); it does not "
                    "have the levels of the model it was fused from"
                )
            if tuple(out[mkey].shape) != tuple(ref[key].shape):
                raise IncompatibleModelsError(
                    f"the fused tensor for {mkey!r} has shape {list(out[mkey].shape)} but the "
                    f"model has {list(ref[key].shape)}; save fused models of other widths with "
                    "their own architecture"
                )
        return out


def _unfold_level(net: AutoNet, index: int, mine: nn.Module, theirs: nn.Module,
                  out: Dict[str, Tensor]) -> None:
    """Write a BatchNorm-folded fused level back onto the original [affine, BN] layers of every
    chain in it (the level itself, a block's branch and shortcut, a concatenation's branches)."""
    for name, seq in mine.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        try:
            other = theirs.get_submodule(name) if name else theirs
        except AttributeError:
            continue
        if isinstance(other, nn.Sequential):
            _unfold_chain(net, index, seq, other, out)


def _unfold_chain(net: AutoNet, index: int, mine: nn.Sequential, theirs: nn.Sequential,
                  out: Dict[str, Tensor]) -> None:
    a, b = list(mine.children()), list(theirs.children())
    if len(a) == len(b):
        return
    names = {id(t): k for k, t in net.state_dict(keep_vars=True).items()}
    j = 0
    i = 0
    while i < len(a):
        m = a[i]
        if (i + 1 < len(a) and isinstance(m, (nn.Linear, nn.Conv2d))
                and isinstance(a[i + 1], (nn.BatchNorm1d, nn.BatchNorm2d)) and j < len(b)
                and isinstance(b[j], type(m))):
            bn, folded = a[i + 1], b[j]

            def key(t: Tensor) -> str:
                return net.model_keys[names[id(t)]]

            with torch.no_grad():
                out[key(m.weight)] = folded.weight.detach().clone()
                fb = folded.bias.detach().clone()
                if m.bias is not None:
                    out[key(m.bias)] = fb
                    bn_bias = torch.zeros_like(fb)
                else:
                    bn_bias = fb
                if bn.weight is not None:
                    out[key(bn.weight)] = torch.ones_like(fb)
                if bn.bias is not None:
                    out[key(bn.bias)] = bn_bias
                elif m.bias is None:
                    raise IncompatibleModelsError(
                        f"level {index}: the folded bias has nowhere to go (neither the layer nor "
                        "its BatchNorm has a bias); fuse this model with kf-gradient"
                    )
                if getattr(bn, "num_batches_tracked", None) is not None:
                    out[key(bn.num_batches_tracked)] = bn.num_batches_tracked.detach().clone()
                if bn.running_mean is not None:
                    out[key(bn.running_mean)] = torch.zeros_like(bn.running_mean)
                    out[key(bn.running_var)] = torch.full_like(bn.running_var, 1.0 - bn.eps)
            i += 2
        else:
            i += 1
        j += 1


# ---------------------------------------------------------------------------------------------
# tracing
# ---------------------------------------------------------------------------------------------
class _Tracer(fx.Tracer):
    def __init__(self, leaves: Tuple[type, ...], blocks: Sequence[nn.Module] = ()) -> None:
        super().__init__()
        self._leaves = leaves
        self._blocks = {id(b) for b in blocks}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if id(m) in self._blocks:
            return True   # a transformer block: one level of its own (levels/_transformer.py)
        if isinstance(m, nn.TransformerEncoder):
            return False  # traced as its layers, see call_module
        return isinstance(m, self._leaves) or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        if isinstance(m, nn.TransformerEncoder) and len(args) == 1 and not any(
                v is not None and v is not False for v in kwargs.values()):
            # without a mask, an encoder is its layers (and its final norm) one after the other
            x = args[0]
            for layer in m.layers:
                x = self.call_module(layer, layer.forward, (x,), {})
            if m.norm is not None:
                x = self.call_module(m.norm, m.norm.forward, (x,), {})
            return x
        return super().call_module(m, forward, args, kwargs)


class _Recorder(fx.Interpreter):
    """Runs the traced graph and keeps every node's value (for shapes and the level check)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: Dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        v = super().run_node(n)
        self.values[n] = v.detach() if isinstance(v, Tensor) else v
        return v


def _has_state(m: nn.Module) -> bool:
    return any(True for _ in m.parameters()) or any(b is not None for b in m.buffers())


def _no_inplace(m: nn.Module) -> nn.Module:
    """A copy of a parameter-free module with ``inplace=False`` (inplace ops in a level would
    overwrite the previous level's output, which the fusion methods keep)."""
    if getattr(m, "inplace", False):
        m = copy.copy(m)
        m.inplace = False
    return m


class _Graph:
    """A traced model with the analyses the cut needs."""

    def __init__(self, model: nn.Module, gm: fx.GraphModule, values: Dict[fx.Node, Any]) -> None:
        self.model = model
        self.gm = gm
        self.values = values
        self.nodes = [n for n in gm.graph.nodes]
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.modules = dict(gm.named_modules())

    def module(self, n: fx.Node) -> Optional[nn.Module]:
        return self.modules.get(str(n.target)) if n.op == "call_module" else None

    def separators(self, nodes: Sequence[fx.Node], start: fx.Node) -> Set[fx.Node]:
        """Nodes of ``nodes`` (in order, after ``start``) after which they are the only live value
        of the sub-graph (get_attr nodes are free: every level can read a parameter)."""
        pos = {n: i for i, n in enumerate(nodes)}
        last: Dict[fx.Node, int] = {}
        inside = set(nodes) | {start}
        for n in [start, *nodes]:
            last[n] = pos.get(n, -1)
        for n in nodes:
            for a in n.all_input_nodes:
                if a in inside and a.op != "get_attr":
                    last[a] = max(last[a], pos[n])
        out: Set[fx.Node] = set()
        alive: Set[fx.Node] = {start}
        for i, n in enumerate(nodes):
            alive = {a for a in alive if last[a] > i}
            if n.op != "get_attr":
                alive.add(n)
            if alive == {n}:
                out.add(n)
        return out


def _kind(g: _Graph, n: fx.Node) -> Optional[str]:
    m = g.module(n)
    if m is not None:
        if isinstance(m, _AFFINE):
            return "affine"
        if block_stages(m) is not None:
            return "stream"   # a transformer block: its output is the residual stream
        if isinstance(m, _NORM):
            return "norm"
        return None
    if n.op == "call_function" and n.target in _ADD_FUNCS:
        return "add"
    if n.op == "call_method" and n.target in ("add", "add_"):
        return "add"
    if _cat_dim(g, n) is not None:
        return "cat"
    return None


def _cat_dim(g: _Graph, n: fx.Node) -> Optional[int]:
    """The dimension of ``n`` if it is a ``torch.cat`` of several tensors along its output's
    neuron axis (1 for ``[B, C]`` and ``[B, C, H, W]``, the last for ``[B, T, C]``), else None."""
    if not (n.op == "call_function" and n.target in _CAT_FUNCS and n.args):
        return None
    parts = n.args[0]
    dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)
    v = g.values.get(n)
    if not (isinstance(parts, (list, tuple)) and len(parts) > 1 and isinstance(dim, int)
            and all(isinstance(p, fx.Node) for p in parts) and isinstance(v, Tensor)):
        return None
    axis = v.dim() - 1 if v.dim() == 3 else 1
    return dim if dim % max(v.dim(), 1) == axis else None


def _eval_identity_node(g: _Graph, n: fx.Node) -> bool:
    m = g.module(n)
    if m is not None:
        return isinstance(m, _DROPOUT) or type(m) is nn.Identity
    if n.op == "call_function" and n.target in _EVAL_IDENTITY_FUNCS:
        return True
    return n.op == "call_method" and n.target in ("contiguous",)


_ACTIVATION_FUNCS = {F.relu, torch.relu, F.relu6, F.gelu, F.silu, torch.sigmoid, torch.tanh, F.hardswish,
                     F.hardsigmoid, F.hardtanh, F.leaky_relu, F.elu, F.mish, F.softplus}


def _activation_node(g: _Graph, n: fx.Node) -> bool:
    """An element-wise activation (module, function or tensor method)."""
    m = g.module(n)
    if m is not None:
        return isinstance(m, ELEMENTWISE)
    if n.op == "call_function":
        return n.target in _ACTIVATION_FUNCS
    return n.op == "call_method" and n.target in ("relu", "sigmoid", "tanh")


def _softmax_node(g: _Graph, n: fx.Node) -> bool:
    """A softmax or log-softmax over the neurons (dim 1 or -1) of a ``[B, C]`` value."""
    v = g.values.get(n)
    if not (isinstance(v, Tensor) and v.dim() == 2):
        return False
    m = g.module(n)
    if m is not None:
        return isinstance(m, (nn.Softmax, nn.LogSoftmax)) and m.dim in (1, -1)
    names = ("softmax", "log_softmax")
    if n.op == "call_function" and getattr(n.target, "__name__", "") in names:
        dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
    elif n.op == "call_method" and n.target in names:
        dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
    else:
        return False
    return dim in (1, -1)


def _valid_output(g: _Graph, n: fx.Node) -> bool:
    v = g.values.get(n)
    if not isinstance(v, Tensor) or v.dim() not in _AXIS_OF_DIM:
        return False
    m = g.module(n)
    # a [B, C, L] Conv1d/BatchNorm1d output has its neurons on dim 1, not last (token axis)
    if v.dim() == 3 and m is not None and isinstance(m, (nn.Conv1d, nn.BatchNorm1d, nn.InstanceNorm1d)):
        return False
    return True


def _cuts(g: _Graph) -> List[fx.Node]:
    """The level outputs: separating pre-activations, the last being the model output."""
    placeholder = g.nodes[0]
    body = [n for n in g.nodes[1:] if n.op != "output"]
    output = g.nodes[-1]
    result = output.args[0]
    if not isinstance(result, fx.Node):
        raise ConfigError("model(x) must return one logits tensor for automatic levels; it returns "
                          f"{type(result).__name__}")
    seps = g.separators(body, placeholder)
    cuts: List[fx.Node] = []
    since = 0
    for n in body:
        i = g.index[n]
        if n is result:
            break
        if n not in seps or _kind(g, n) is None or not _valid_output(g, n):
            continue
        seg = [m for m in g.nodes[since + 1:i + 1]]
        if not any(_kind(g, m) in ("affine", "stream") for m in seg):
            continue
        users = list(n.users)
        if len(users) == 1 and _kind(g, n) in ("affine", "norm") and _kind(g, users[0]) == "norm" \
                and users[0].args and users[0].args[0] is n:
            continue  # a normalisation follows: it ends this level (Conv -> BN)
        cuts.append(n)
        since = i
    tail = g.nodes[since + 1:g.index[result] + 1]
    if cuts and not any(_kind(g, m) in ("affine", "stream") for m in tail):
        cuts.pop()  # trailing parameter-free ops (a final dropout) join the last level
    cuts.append(result)
    return cuts


# ---------------------------------------------------------------------------------------------
# building levels from sub-graphs
# ---------------------------------------------------------------------------------------------
def _subgraph_module(g: _Graph, nodes: Sequence[fx.Node], start: fx.Node, end: fx.Node
                     ) -> fx.GraphModule:
    """``nodes`` (in order) as a module from the value of ``start`` to that of ``end``."""
    graph = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {start: graph.placeholder("x")}
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in env:
                if a.op == "get_attr":
                    env[a] = graph.node_copy(a, lambda x: env[x])
                else:  # pragma: no cover - guarded by the separator analysis
                    raise ConfigError(f"internal error: {a.name} is used outside its level")
        new = graph.node_copy(n, lambda x: env[x])
        if n.op == "call_function" and new.kwargs.get("inplace"):
            new.kwargs = {**new.kwargs, "inplace": False}
        if n.op == "call_method" and str(n.target).endswith("_") and not str(n.target).endswith("__"):
            new.target = str(n.target)[:-1]  # relu_ -> relu: never change the level's input
        env[n] = new
    graph.output(env[end])
    gm = fx.GraphModule(g.gm, graph, class_name="Ops")
    for name, m in list(gm.named_modules()):
        if getattr(m, "inplace", False) and not _has_state(m):
            parent, _, attr = name.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, attr, _no_inplace(m))
    return gm


def _glue(g: _Graph, nodes: Sequence[fx.Node], start: fx.Node) -> nn.Module:
    if len(nodes) == 1:
        n = nodes[0]
        m = g.module(n)
        if m is not None and len(n.all_input_nodes) == 1 and not n.kwargs and len(n.args) == 1:
            return _no_inplace(m)
    gm = _subgraph_module(g, nodes, start, nodes[-1])
    ident = [_eval_identity_node(g, n) for n in nodes]
    soft = [_softmax_node(g, n) for n in nodes]
    act = [_activation_node(g, n) for n in nodes]
    return Glue(gm, all(ident), any(soft) and all(a or b for a, b in zip(ident, soft)),
                any(act) and all(a or b for a, b in zip(ident, act)))


def _chain(g: _Graph, nodes: Sequence[fx.Node], start: fx.Node) -> Optional[nn.Sequential]:
    """``nodes`` as an ``nn.Sequential`` of the model's own layers and parameter-free glue, or
    ``None`` if it is not a chain (a layer with parameters reads something else than the
    previous value, or a parameter is used directly)."""
    if any(a.op == "get_attr" for n in nodes for a in n.all_input_nodes):
        return None
    seps = g.separators(nodes, start)
    parts: List[nn.Module] = []
    run: List[fx.Node] = []
    prev = start
    for n in nodes:
        m = g.module(n)
        if m is not None and _has_state(m):
            inp = run[-1] if run else prev
            if (n.all_input_nodes != [inp] or len(n.args) != 1 or n.kwargs
                    or not (n in seps or n is nodes[-1])):
                return None
            if run:
                if inp not in seps:
                    return None
                parts.append(_glue(g, run, prev))
                run = []
            parts.append(m)
            prev = n
        else:
            run.append(n)
    if run:
        parts.append(_glue(g, run, prev))
    return nn.Sequential(*parts)


def _ancestors(node: fx.Node, stop: fx.Node, inside: Set[fx.Node]) -> Set[fx.Node]:
    out: Set[fx.Node] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        if n is stop or n in out or n not in inside:
            continue
        out.add(n)
        todo.extend(n.all_input_nodes)
    return out


def _block(g: _Graph, nodes: Sequence[fx.Node], start: fx.Node) -> Optional[AutoBlock]:
    """``nodes`` as ``branch(pre(x)) + shortcut(pre(x))``, or ``None``."""
    end = nodes[-1]
    if _kind(g, end) != "add" or len(end.all_input_nodes) != 2 or end.kwargs:
        return None
    fork, k = _fork(g, nodes, start)
    pre_nodes = list(nodes[:k])
    found = _paths(g, list(nodes[k:-1]), fork, list(end.all_input_nodes))
    if found is None:
        return None
    paths = found
    if paths[0] is None and paths[1] is None:
        return None
    n_aff = [0 if p is None else sum(isinstance(m, _AFFINE) for m in p.modules()) for p in paths]
    bi = 0 if n_aff[0] >= n_aff[1] else 1
    branch, shortcut = paths[bi], paths[1 - bi]
    pre: nn.Module = _glue(g, pre_nodes, start) if pre_nodes else nn.Identity()
    return AutoBlock(pre, branch, shortcut if shortcut is not None else nn.Identity())


def _fork(g: _Graph, nodes: Sequence[fx.Node], start: fx.Node) -> Tuple[fx.Node, int]:
    """The last separator before the first layer with parameters (where the paths of a block or
    a concatenation part), and how many nodes come before the paths."""
    seps = g.separators(nodes, start)
    fork, k = start, 0
    for idx, n in enumerate(nodes[:-1]):
        m = g.module(n)
        if m is not None and _has_state(m):
            break
        if n in seps:
            fork, k = n, idx + 1
    return fork, k


def _paths(g: _Graph, rest: Sequence[fx.Node], fork: fx.Node, ends: Sequence[fx.Node]
           ) -> Optional[List[Optional[nn.Sequential]]]:
    """One chain per node of ``ends`` (``None`` where the end is the fork itself), made of the
    disjoint sets of nodes of ``rest`` that lead to it from ``fork`` alone; ``None`` if ``rest``
    is not such a set of chains."""
    inside = set(rest)
    ancestors = [_ancestors(e, fork, inside) for e in ends]
    if set().union(*ancestors) != inside or sum(len(a) for a in ancestors) != len(inside):
        return None
    paths: List[Optional[nn.Sequential]] = []
    for p, e in zip(ancestors, ends):
        if e is fork:
            paths.append(None)
            continue
        seq = [n for n in rest if n in p]
        if not seq or any(x not in p and x is not fork for n in seq for x in n.all_input_nodes
                          if x.op != "get_attr"):
            return None
        c = _chain(g, seq, fork)
        if c is None:
            return None
        paths.append(c)
    return paths


def _concat(g: _Graph, nodes: Sequence[fx.Node], start: fx.Node) -> Optional[AutoConcat]:
    """``nodes`` as ``cat([b(pre(x)) for b in branches])``, or ``None``."""
    end = nodes[-1]
    dim = _cat_dim(g, end)
    if dim is None:
        return None
    fork, k = _fork(g, nodes, start)
    paths = _paths(g, list(nodes[k:-1]), fork, list(end.args[0]))  # type: ignore[arg-type]
    if paths is None or all(p is None for p in paths):
        return None
    pre: nn.Module = _glue(g, list(nodes[:k]), start) if k else nn.Identity()
    return AutoConcat(pre, [nn.Identity() if p is None else p for p in paths], dim)


def _build_level(g: _Graph, nodes: Sequence[fx.Node], start: fx.Node, index: int
                 ) -> Tuple[nn.Module, str]:
    c = _chain(g, nodes, start)
    if c is not None:
        return c, "chain"
    blk = _block(g, nodes, start)
    if blk is not None:
        return blk, "block"
    cat = _concat(g, nodes, start)
    if cat is not None:
        return cat, "concat"
    gm = _subgraph_module(g, nodes, start, nodes[-1])
    spec = affixed_block(g, gm, nodes, start)
    if spec is not None:   # tokens made ready (CLS token, position embedding), then a transformer block
        level = AutoGraph(gm, "")
        level.transformer_spec = spec
        return level, "graph"
    direct = sorted({str(a.target) for n in nodes for a in n.all_input_nodes if a.op == "get_attr"})
    why = (f"it uses parameters directly ({', '.join(direct)})" if direct
           else "it is a sub-graph with several paths (attention or a skip connection that is not "
                "a two-path residual block)")
    return AutoGraph(gm, f"level {index} is not a chain of layers: {why}"), "graph"


def _describe(g: _Graph, nodes: Sequence[fx.Node]) -> str:
    names = []
    for n in nodes:
        m = g.module(n)
        if m is not None:
            names.append(str(n.target))
        elif n.op in ("call_function", "call_method"):
            t = n.target
            names.append(getattr(t, "__name__", str(t)))
    if len(names) > 6:
        names = names[:2] + ["..."] + names[-3:]
    return " -> ".join(names)


# ---------------------------------------------------------------------------------------------
# the forward-hook fallback
# ---------------------------------------------------------------------------------------------
def _hook_levels(model: nn.Module, x: Tensor) -> Tuple[List[nn.Module], List[str]]:
    calls: List[Tuple[str, nn.Module, Any, Any]] = []
    hooks = []
    for name, m in model.named_modules():
        if name and not list(m.children()):
            def hook(mod: nn.Module, inp: Any, out: Any, name: str = name) -> None:
                calls.append((name, mod, inp, out))
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    if not calls:
        raise ConfigError(f"{type(model).__name__} runs no sub-modules; declare its levels")
    prev: Any = x
    for name, m, inp, out in calls:
        if not (isinstance(inp, tuple) and len(inp) == 1 and inp[0] is prev):
            raise ConfigError(
                f"module {name!r} does not read the previous module's output (a functional "
                "operation or skip connection in forward), which forward hooks cannot see"
            )
        prev = out
    parts: List[List[Tuple[str, nn.Module]]] = []
    cur: List[Tuple[str, nn.Module]] = []
    for i, (name, m, _, _) in enumerate(calls):
        cur.append((name, m if _has_state(m) else _no_inplace(m)))
        nxt = calls[i + 1][1] if i + 1 < len(calls) else None
        ends = isinstance(m, _AFFINE + _NORM) and not (
            isinstance(m, _AFFINE) and isinstance(nxt, _NORM))
        if ends and any(isinstance(mm, _AFFINE) for _, mm in cur):
            parts.append(cur)
            cur = []
    if cur:
        if parts and not any(isinstance(mm, _AFFINE) for _, mm in cur):
            parts[-1].extend(cur)  # trailing parameter-free modules join the last level
        else:
            parts.append(cur)
    levels: List[nn.Module] = [nn.Sequential(*[mm for _, mm in part]) for part in parts]
    names = [" -> ".join(n for n, _ in part) for part in parts]
    return levels, names


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------
def _model_keys(net: nn.Module, model: nn.Module) -> Dict[str, str]:
    ids = {id(t): k for k, t in model.state_dict(keep_vars=True).items()}
    return {k: ids[id(t)] for k, t in net.state_dict(keep_vars=True).items() if id(t) in ids}


def auto_levels(model: nn.Module, input_shape: Sequence[int], num_classes: Optional[int] = None,
                *, atol: float = 1e-5, seed: int = 0, leaf_modules: Sequence[type] = ()) -> AutoNet:
    """Find the levels of ``model`` automatically (see the module docstring).

    Parameters
    ----------
    model : nn.Module
        The user's network; ``model(x)`` must return logits ``[B, num_classes]``.
    input_shape : sequence of int
        Shape of one input sample, e.g. ``(3, 32, 32)``.
    num_classes : int, optional
        Width of the output; default: inferred.
    atol : float
        Tolerance of the check that the levels reproduce ``model(x)``.
    seed : int
        Seed of the random check input.
    leaf_modules : sequence of type
        Module classes that tracing must not enter (they become single operations).

    Returns
    -------
    AutoNet
        A :class:`~neurofuse.levels.LeveledNet` whose levels are ``model``'s own modules.

    Raises
    ------
    ConfigError
        If the model cannot be cut (it does not return one logits tensor, the fallback cannot
        see its operations) or the levels do not reproduce ``model(x)``.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"automatic levels need an nn.Module, got {type(model).__name__}")
    shape = check_input_shape(input_shape)
    try:
        ref_param = next(model.parameters())
        device, dtype = ref_param.device, ref_param.dtype
    except StopIteration:
        raise ConfigError(f"{type(model).__name__} has no parameters: nothing to fuse") from None
    gen = torch.Generator().manual_seed(int(seed))
    first = next((m for m in model.modules() if any(True for _ in m.parameters(recurse=False))), None)
    if isinstance(first, (nn.Embedding, nn.EmbeddingBag)):   # token ids: a probe inside the vocabulary
        x = torch.randint(0, first.num_embeddings, (3, *shape), generator=gen).to(device=device, dtype=dtype)
    else:
        x = torch.randn((3, *shape), generator=gen).to(device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        kinds: List[str]
        try:
            # transformer blocks are recognised (and checked by running them) before tracing
            blocks = [m for name, m in model.named_modules() if name and block_stages(m) is not None]
            tracer = _Tracer(tuple(leaf_modules), blocks)
            graph = tracer.trace(model, concrete_args=_defaults(model) or None)
            _drop_specialised(graph)
            gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
            rec = _Recorder(gm)
            with torch.no_grad():
                rec.run(x)
            g = _Graph(model, gm, rec.values)
            cuts = _cuts(g)
            levels, names, kinds = [], [], []
            start = g.nodes[0]
            for i, cut in enumerate(cuts):
                seg = [n for n in g.nodes[g.index[start] + 1:g.index[cut] + 1] if n.op != "get_attr"]
                level, kind = _build_level(g, seg, start, i)
                levels.append(level)
                kinds.append(kind)
                names.append(_describe(g, seg))
                start = cut
            how = "fx"
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - any tracing failure falls back to hooks
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log.warning("torch.fx cannot trace %s (%s); falling back to forward hooks (module order "
                        "only: functional operations in forward are not seen)",
                        type(model).__name__, first)
            try:
                levels, names = _hook_levels(model, x)
            except Exception as hook_exc:  # noqa: BLE001 - the model itself fails on the probe input
                hook_exc = str(hook_exc).splitlines()[0] if str(hook_exc) else type(hook_exc).__name__  # type: ignore[assignment]
                raise ConfigError(
                    f"cannot find the levels of {type(model).__name__} automatically: torch.fx "
                    f"cannot trace it ({first}) and the forward-hook fallback failed: {hook_exc}; "
                    "declare the levels with levels_from(model, levels=[...])"
                ) from None
            kinds = ["chain"] * len(levels)
            how = "hooks"
        check_not_shared(levels, model)   # a module applied twice would fuse to chance
        axes = _check(model, levels, names, x, atol)
        with torch.no_grad():
            out = levels[-1](_compose(levels[:-1], x))
    finally:
        model.train(was_training)
    if num_classes is not None and int(num_classes) != out.shape[1]:
        raise ConfigError(f"num_classes is {num_classes} but the model outputs {out.shape[1]} classes")
    net = AutoNet(levels, axes, shape, int(out.shape[1]), names, type(model).__name__, kinds, how, {})
    net.model_keys = _model_keys(net, model)
    missing = set(model.state_dict().keys()) - set(net.model_keys.values())
    if missing:
        raise ConfigError(
            f"tensors {sorted(missing)[:5]} of {type(model).__name__} belong to no automatic level "
            "(used outside forward?); declare the levels with levels_from(model, levels=[...])"
        )
    net.train(was_training)
    log.info("automatic levels of %s (%s): %s", type(model).__name__, how,
             ", ".join(f"{k}:{w}" for k, w in zip(kinds, net.level_widths())))
    return net


def _defaults(model: nn.Module) -> Dict[str, Any]:
    """The forward arguments after the input that have defaults: ``model(x)`` runs with them, so
    tracing specialises them (``torch.fx`` ``concrete_args``; e.g. ``forward(x, flag=False)``)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    named = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return {p.name: p.default for p in named[1:] if p.default is not p.empty}


_GUARDS = {operator.eq, torch._assert, getattr(fx._symbolic_trace, "_assert_is_none", None)}


def _drop_specialised(graph: fx.Graph) -> None:
    """Remove the placeholders of specialised arguments and the guards ``torch.fx`` adds for
    them, so that the traced graph takes the input alone (their values are inlined)."""

    def guards(n: fx.Node) -> bool:
        return n.op == "call_function" and n.target in _GUARDS and all(guards(u) for u in n.users)

    def erase(n: fx.Node) -> None:
        for u in list(n.users):
            erase(u)
        graph.erase_node(n)

    for ph in [n for n in graph.nodes if n.op == "placeholder"][1:]:
        if all(guards(u) for u in ph.users):
            erase(ph)


def _compose(levels: Sequence[nn.Module], x: Tensor) -> Tensor:
    for lv in levels:
        x = lv(x)
    return x


def _check(model: nn.Module, levels: Sequence[nn.Module], names: Sequence[str], x: Tensor,
           atol: float) -> List[str]:
    """Run the levels after each other on ``x`` and compare with ``model(x)``; the axes."""
    with torch.no_grad():
        ref = model(x)
        if not isinstance(ref, Tensor) or ref.dim() != 2:
            raise ConfigError(
                f"model(x) must return logits [B, classes], got "
                f"{list(ref.shape) if isinstance(ref, Tensor) else type(ref).__name__}"
            )
        axes: List[str] = []
        h = x
        for i, (lv, name) in enumerate(zip(levels, names)):
            try:
                h = lv(h)
            except Exception as exc:  # noqa: BLE001
                raise ConfigError(f"automatic level {i} ({name}) fails on the previous level's "
                                  f"output: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
            axis = _AXIS_OF_DIM.get(h.dim()) if isinstance(h, Tensor) else None
            if axis is None:
                raise ConfigError(f"automatic level {i} ({name}) outputs "
                                  f"{list(h.shape) if isinstance(h, Tensor) else type(h).__name__}, "
                                  "not [B, C], [B, T, C] or [B, C, H, W]")
            axes.append(axis)
        diff = float((h - ref).abs().max()) if h.shape == ref.shape else float("inf")
        if diff > atol + atol * float(ref.abs().max()):
            raise ConfigError(
                f"the automatic levels of {type(model).__name__} do not reproduce model(x) (they "
                f"differ by up to {diff:.3g}); forward probably depends on something tracing does "
                "not see: declare the levels with levels_from(model, levels=[...])"
            )
    axes[-1] = "dense"
    return axes
