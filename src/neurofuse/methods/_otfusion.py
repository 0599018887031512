r"""OTFusion: align every model to an anchor with optimal transport, then average.

Singh & Jaggi, "Model Fusion via Optimal Transport", NeurIPS 2020 (activation-based variant).

The module also holds the alignment machinery shared with :mod:`._rebasin`: how the parameters
of a level are written in another model's neuron basis (:func:`align_level`), which tensors of a
level belong to its input and to its output neurons (:class:`LevelLayout`), and how residual
levels tie the neurons of several levels together (:func:`residual_heads`).

Notation
--------
Model :math:`k` has :math:`n` neurons at a level, the anchor :math:`m`.  A transport map
:math:`T \in \mathbb{R}_{\ge 0}^{n\times m}` with row sums :math:`\mu` (model :math:`k`'s
marginal) and column sums :math:`\nu` (the anchor's marginal) moves model :math:`k`'s neurons onto
the anchor's.  With

.. math:: Q = \operatorname{diag}(1/\nu)\, T^\top \in \mathbb{R}^{m\times n}, \qquad
          P = T\, \operatorname{diag}(1/\nu) \in \mathbb{R}^{n\times m},

every row of :math:`Q` is a convex combination of model :math:`k`'s neurons (a barycentric
projection onto anchor neuron :math:`j`).  A level with weight :math:`W` (output neurons on the
rows, input neurons on the columns) is aligned as

.. math:: \widetilde W = Q\, W\, P_{\text{prev}}, \qquad \tilde b = Q\, b,

where :math:`P_{\text{prev}}` is the previous level's map (the identity at the input) and
:math:`Q` is the identity at the output level.  For a convolution the right product acts on the
input-channel axis of every kernel tap; for a linear layer after a flattened feature map (VGG's
classifier) it acts on the channel axis of every spatial position.  For a permutation (uniform
marginals, equal widths) :math:`Q = \Pi^\top` and :math:`P = \Pi`, so the aligned model computes
exactly the same function as the original.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from .._fusion_set import FusionSet
from ..errors import ConfigError, IncompatibleModelsError
from ..importance import neuron_importance
from ..levels import LeveledNet, check_same_levels, flatten_neurons
from ._base import FusionMethod, register_method

__all__ = [
    "LevelLayout",
    "NeuronMap",
    "OTFusion",
    "OTFusionOptions",
    "Space",
    "align_level",
    "level_adds_input",
    "level_layout",
    "residual_heads",
]

log = logging.getLogger("neurofuse")

_AFFINE = (nn.Linear, nn.Conv2d)
_CHANNEL = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)
#: element-wise non-linearities a level may start with (used for post-activation matching)
_ACTIVATIONS = (nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.SiLU)


# ---------------------------------------------------------------------------------------------
# level layout: which tensors follow which neurons
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Space:
    """An internal neuron space of a level (the output of one of its inner affine layers).

    ``point`` names the module (relative to the level) whose output is the space's
    pre-activation; ``act`` the parameter-free module applied next (``None`` if none).
    """

    name: str
    point: str
    act: Optional[str]


@dataclasses.dataclass(frozen=True)
class LevelLayout:
    """Which tensors of a level (state-dict keys relative to the level) follow which neurons.

    Neuron spaces are ``"in"`` (the level input = the previous level's output), ``"out"`` (the
    level output) and the level's internal spaces (``"h0"``, ``"h1"``, ...).

    Attributes
    ----------
    tensors : tuple of (key, space0, space1, kind)
        ``space0`` is the space of axis 0, ``space1`` that of axis 1 for affine weights
        (``None`` otherwise), ``kind`` is ``"linear"``, ``"conv"`` or ``"vector"``.
    internal : tuple of Space
        Internal spaces, in forward order.
    tied : bool
        The level adds its input to its output (identity skip): ``"out"`` *is* ``"in"``.
    """

    tensors: Tuple[Tuple[str, str, Optional[str], str], ...]
    internal: Tuple[Space, ...]
    tied: bool

    def keys_in(self, space: str) -> List[str]:
        """Keys whose axis 0 runs over ``space``."""
        return [k for k, s0, _, _ in self.tensors if s0 == space]


def level_adds_input(level: nn.Module) -> bool:
    """Whether a level declares an identity skip connection.

    Either ``level.adds_input = True`` (``output = level(input)`` already includes ``+ input``),
    or the residual-block protocol of :class:`neurofuse.models.resnet.BasicBlock`: attributes
    ``branch`` and ``shortcut`` with ``shortcut`` an ``nn.Identity``.
    """
    if getattr(level, "adds_input", False):
        return True
    return _is_block(level) and isinstance(getattr(level, "shortcut"), nn.Identity)


def _is_block(level: nn.Module) -> bool:
    return isinstance(getattr(level, "branch", None), nn.Module) and isinstance(
        getattr(level, "shortcut", None), nn.Module)


def _own_tensors(m: nn.Module) -> List[Tuple[str, Tensor]]:
    return list(m.named_parameters(recurse=False)) + [
        (n, b) for n, b in m.named_buffers(recurse=False) if b is not None]


def level_layout(level: nn.Module, index: int, method: str = "otfusion") -> LevelLayout:
    """Describe a level for alignment.

    A level is read as one or two *paths* of leaf modules in registration order: the level
    itself, or, for a residual block (attributes ``branch`` and ``shortcut``, computing
    ``branch(f(x)) + shortcut(f(x))`` with ``f`` parameter-free, as
    :class:`neurofuse.models.resnet.BasicBlock`), its ``branch`` and its ``shortcut`` (unless the
    shortcut is the identity, which ties the output neurons to the input neurons).  A path holds
    ``Linear`` / ungrouped ``Conv2d`` layers, per-channel normalisations (``BatchNorm1d/2d``,
    ``LayerNorm`` over the neurons) and parameter-free modules.  Its first affine layer reads the
    level input, its last writes the level output and each inner one opens an internal space.

    Raises
    ------
    IncompatibleModelsError
        If the level has no affine layer, a grouped convolution or another module with parameters.
    """
    if _is_block(level):
        paths = [("branch.", level.branch)]
        if not isinstance(level.shortcut, nn.Identity):
            paths.append(("shortcut.", level.shortcut))
        for n, m in level.named_modules():
            if n and not (n.startswith("branch") or n.startswith("shortcut")) and _own_tensors(m):
                raise IncompatibleModelsError(
                    f"level {index} holds parameters outside its branch and shortcut ({n}); "
                    f"{method!r} cannot align it"
                )
    else:
        paths = [("", level)]
    for n, m in level.named_modules():
        if list(m.children()) and _own_tensors(m):
            raise IncompatibleModelsError(
                f"level {index}: {type(m).__name__} {n or '(the level)'} holds parameters of its own "
                f"next to its sub-modules; {method!r} aligns only Linear/Conv2d layers and "
                "per-channel normalisations (use 'kf-gradient' for such levels)"
            )
    tensors: List[Tuple[str, str, Optional[str], str]] = []
    internal: List[Space] = []
    for prefix, root in paths:
        leaves = [(prefix + n, m) for n, m in root.named_modules() if not list(m.children())]
        n_aff = sum(isinstance(m, _AFFINE) for _, m in leaves)
        if n_aff == 0:
            raise IncompatibleModelsError(
                f"level {index} has no Linear/Conv2d layer{' in ' + prefix[:-1] if prefix else ''}; "
                f"{method!r} aligns levels that end at an affine layer"
            )
        current, seen, open_space = "in", 0, None  # open_space: internal space still taking its point
        for name, m in leaves:
            if isinstance(m, _AFFINE):
                if isinstance(m, nn.Conv2d) and m.groups != 1:
                    raise IncompatibleModelsError(
                        f"level {index} has a grouped convolution (groups={m.groups}); {method!r} "
                        "aligns only ungrouped convolutions"
                    )
                seen += 1
                out_space = "out" if seen == n_aff else f"h{len(internal)}"
                kind = "conv" if isinstance(m, nn.Conv2d) else "linear"
                tensors.append((f"{name}.weight", out_space, current, kind))
                if m.bias is not None:
                    tensors.append((f"{name}.bias", out_space, None, "vector"))
                if out_space != "out":
                    internal.append(Space(out_space, name, None))
                    open_space = len(internal) - 1
                else:
                    open_space = None
                current = out_space
                continue
            own = _own_tensors(m)
            if own:
                if not isinstance(m, _CHANNEL):
                    raise IncompatibleModelsError(
                        f"level {index} holds a {type(m).__name__} with parameters; {method!r} aligns "
                        "only Linear/Conv2d layers and per-channel normalisations (use 'kf-gradient' "
                        "for such levels)"
                    )
                for pn, t in own:
                    if t.dim() == 0:
                        continue  # num_batches_tracked: a counter, copied from the anchor
                    if t.dim() != 1:
                        raise IncompatibleModelsError(
                            f"level {index}: {type(m).__name__} normalises over several axes; "
                            f"{method!r} aligns only per-channel normalisations"
                        )
                    tensors.append((f"{name}.{pn}", current, None, "vector"))
                if open_space is not None:
                    sp = internal[open_space]
                    internal[open_space] = Space(sp.name, name, None)
            elif open_space is not None:
                sp = internal[open_space]
                internal[open_space] = Space(sp.name, sp.point, name)
                open_space = None
        if current != "out":  # pragma: no cover - guarded by n_aff > 0
            raise IncompatibleModelsError(f"level {index}: a path does not reach the level output")
    return LevelLayout(tuple(tensors), tuple(internal), level_adds_input(level))


def residual_heads(layouts: Sequence[LevelLayout]) -> List[int]:
    """For every level, the first level of its *residual stream* (``-1``: the network input).

    Levels tied by identity skip connections (:func:`level_adds_input`) share their output
    neurons with the level before them; a chain of such levels is one stream and is aligned with
    one transport map, computed from the activations of every level in the stream.
    """
    heads: List[int] = []
    for i, lay in enumerate(layouts):
        if lay.tied:
            heads.append(heads[i - 1] if i > 0 else -1)
        else:
            heads.append(i)
    return heads


def stream_members(heads: Sequence[int], head: int) -> List[int]:
    """The levels of the stream that starts at ``head`` (contiguous)."""
    return [i for i, h in enumerate(heads) if h == head]


def activation_module(module: Optional[nn.Module]) -> nn.Module:
    """``module`` if it is an element-wise activation, ReLU otherwise."""
    return module if isinstance(module, _ACTIVATIONS) else nn.ReLU()


def next_activation(net: LeveledNet, level: int) -> nn.Module:
    """The non-linearity applied to ``level``'s output: the first leaf module of the next level
    when it is an element-wise activation, ReLU otherwise."""
    if level + 1 < net.num_levels:
        for m in net.levels[level + 1].modules():
            if len(list(m.children())) == 0:
                return activation_module(m)
    return nn.ReLU()


def check_alignable(nets: Sequence[LeveledNet], method: str) -> Tuple[List[LevelLayout], List[int]]:
    """Layouts and residual heads of the anchor, checked to be the same for every model."""
    layouts = [level_layout(lv, i, method) for i, lv in enumerate(nets[0].levels)]
    for k, net in enumerate(nets[1:], start=1):
        for i, lv in enumerate(net.levels):
            lk = level_layout(lv, i, method)
            if lk != layouts[i]:
                raise IncompatibleModelsError(
                    f"model {k} level {i} has different layers or skip connections than model 0's; "
                    f"{method!r} needs the same architecture up to widths"
                )
    return layouts, residual_heads(layouts)


def capture(module: nn.Module, run) -> Tensor:  # type: ignore[no-untyped-def]
    """The output of ``module`` while ``run()`` executes (a forward hook)."""
    store: Dict[str, Tensor] = {}
    handle = module.register_forward_hook(lambda _m, _i, o: store.__setitem__("z", o))
    try:
        run()
    finally:
        handle.remove()
    if "z" not in store:  # pragma: no cover - the layout names modules on the forward path
        raise IncompatibleModelsError(f"{type(module).__name__} was not run by its level's forward")
    return store["z"]


# ---------------------------------------------------------------------------------------------
# applying transport maps to parameters
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class NeuronMap:
    r"""The two faces of a transport map ``T`` ``[n, m]`` with target marginal ``nu``.

    ``out`` is :math:`Q = \operatorname{diag}(1/\nu) T^\top` (``[m, n]``, rows sum to one):
    it writes a per-neuron quantity of model ``k`` in the anchor's basis.  ``inc`` is
    :math:`P = T \operatorname{diag}(1/\nu)` (``[n, m]``): it feeds anchor-basis inputs to a layer
    that expects model ``k``'s neurons.
    """

    out: Tensor
    inc: Tensor
    plan: np.ndarray

    @classmethod
    def from_plan(cls, plan: np.ndarray, nu: np.ndarray) -> "NeuronMap":
        p = torch.from_numpy(np.asarray(plan, dtype=np.float64) / np.asarray(nu, dtype=np.float64)[None, :])
        return cls(out=p.T.contiguous(), inc=p, plan=np.asarray(plan, dtype=np.float64))


def _map_out(t: Tensor, q: Tensor) -> Tensor:
    """Rows of ``t`` (axis 0 = neurons) written in the target basis: ``q @ t``."""
    return torch.tensordot(q.to(t.device), t, dims=([1], [0]))


def _map_in(w: Tensor, p: Tensor, kind: str, level: int) -> Tensor:
    """Input axis (1) of an affine weight fed with target-basis inputs: ``w @ p`` per tap."""
    p = p.to(w.device)
    n = p.shape[0]
    if kind == "conv":
        if w.shape[1] != n:
            raise IncompatibleModelsError(
                f"level {level}: the convolution takes {w.shape[1]} channels but its input has "
                f"{n} neurons"
            )
        return torch.einsum("oikl,ij->ojkl", w, p)
    d_in = w.shape[1]
    if d_in == n:
        return w @ p
    if d_in % n == 0:  # Linear after Flatten of [C, H, W]: channel-major, one map per position
        w3 = w.reshape(w.shape[0], n, d_in // n)
        return torch.einsum("ois,ij->ojs", w3, p).reshape(w.shape[0], -1)
    raise IncompatibleModelsError(
        f"level {level}: the linear layer takes {d_in} inputs, not a multiple of the previous "
        f"level's {n} neurons"
    )


SpaceMaps = Dict[str, Optional[NeuronMap]]


def align_level(level: nn.Module, layout: LevelLayout, index: int, maps: SpaceMaps) -> Dict[str, Tensor]:
    """State dict of ``level`` with every neuron space in ``maps`` written in the anchor's basis.

    ``maps`` gives a :class:`NeuronMap` per space (``"in"``, ``"out"``, internal names); a
    missing or ``None`` space is left as it is (identity, or not aligned yet).  The arithmetic
    is done in float64 and cast back to each tensor's dtype.
    """
    spec = {key: (s0, s1, kind) for key, s0, s1, kind in layout.tensors}
    result: Dict[str, Tensor] = {}
    for key, v in level.state_dict().items():
        if not v.is_floating_point() or key not in spec:
            result[key] = v.clone()
            continue
        s0, s1, kind = spec[key]
        t = v.double()
        if s1 is not None and maps.get(s1) is not None:
            t = _map_in(t, maps[s1].inc, kind, index)  # type: ignore[union-attr]
        if maps.get(s0) is not None:
            t = _map_out(t, maps[s0].out)  # type: ignore[union-attr]
        result[key] = t.to(v.dtype)
    return result


def identity_ok(widths: Sequence[List[int]], level: int, why: str) -> None:
    """Raise unless every model has the anchor's width at ``level`` (identity transport)."""
    w = [bw[level] for bw in widths]
    if len(set(w)) != 1:
        raise IncompatibleModelsError(
            f"level {level} has widths {w} but must be aligned by the identity ({why}); give the "
            "models equal widths there"
        )


def normalized(scores: np.ndarray) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    return s / s.sum()


# ---------------------------------------------------------------------------------------------
# OTFusion
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class OTFusionOptions:
    """Settings of :class:`OTFusion`.

    Attributes
    ----------
    solver : str
        ``"exact"`` (earth mover's distance, ``ot.emd``) or ``"sinkhorn"`` (entropic OT,
        ``ot.sinkhorn`` in the log domain).
    reg : float
        Entropic regularisation of ``"sinkhorn"``, relative to the largest ground cost (the cost
        matrix is divided by its maximum before solving; the exact solver is unaffected).
    ground_metric : str
        ``"euclidean"`` (the reference code's ``cdist``) or ``"sqeuclidean"`` between the neurons'
        pre-activation vectors over the fusion set.
    max_iter : int
        Iteration limit of the OT solver.
    """

    solver: str = "exact"
    reg: float = 0.01
    ground_metric: str = "euclidean"
    max_iter: int = 1_000_000

    def __post_init__(self) -> None:
        if self.solver not in ("exact", "sinkhorn"):
            raise ConfigError(f"solver must be 'exact' or 'sinkhorn', got {self.solver!r}")
        if not (isinstance(self.reg, (int, float)) and self.reg > 0):
            raise ConfigError(f"reg must be a positive number, got {self.reg!r}")
        if self.ground_metric not in ("euclidean", "sqeuclidean"):
            raise ConfigError(
                f"ground_metric must be 'euclidean' or 'sqeuclidean', got {self.ground_metric!r}")
        if not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise ConfigError(f"max_iter must be a positive integer, got {self.max_iter!r}")


class _PairStats:
    """Streams the pairwise (squared) distances between the columns of two row blocks."""

    def __init__(self) -> None:
        self.aa: Optional[Tensor] = None
        self.bb: Optional[Tensor] = None
        self.ab: Optional[Tensor] = None

    def update(self, a: Tensor, b: Tensor) -> None:
        a, b = a.double(), b.double()
        aa, bb, ab = (a * a).sum(0), (b * b).sum(0), a.T @ b
        if self.aa is None:
            self.aa, self.bb, self.ab = aa, bb, ab
        else:
            self.aa += aa
            self.bb += bb
            self.ab += ab  # type: ignore[operator]

    def sq_dist(self) -> np.ndarray:
        assert self.aa is not None and self.bb is not None and self.ab is not None
        d = self.aa[:, None] + self.bb[None, :] - 2.0 * self.ab
        return d.clamp_min(0.0).cpu().numpy()


@register_method("otfusion")
class OTFusion(FusionMethod):
    r"""OTFusion (activation-based): optimal-transport alignment to an anchor, then averaging.

    Model 0 is the anchor.  Every other model :math:`k` is aligned to it level by level, from the
    input: at level :math:`\ell` the level's input side is first written in the anchor's basis
    (with the previous level's map), then the ground metric between model :math:`k`'s neurons
    :math:`i` and the anchor's neurons :math:`j` is

    .. math:: C_{ij} = \lVert z^{(k)}_{\cdot i} - z^{(0)}_{\cdot j}\rVert_2
              \quad(\text{or its square}),

    where :math:`z^{(k)}` are the pre-activations of the *partially aligned* model :math:`k`
    (its levels :math:`<\ell` already aligned, so its activations are recomputed as alignment
    progresses) and :math:`z^{(0)}` the anchor's, both on the fusion set with convolutional
    outputs flattened over (batch, height, width).  The transport map solves

    .. math:: T = \arg\min_{T\ge 0,\ T\mathbf 1=\mu,\ T^\top\mathbf 1=\nu} \langle T, C\rangle
              \;\bigl(-\,\varepsilon H(T)\ \text{for Sinkhorn}\bigr),

    with :math:`\mu, \nu` the importance scores of model :math:`k` and of the anchor normalised to
    probability vectors (uniform by default).  The level is aligned as
    :math:`\widetilde W = \operatorname{diag}(1/\nu) T^\top W P_{\text{prev}}`,
    :math:`P_{\text{prev}} = T_{\text{prev}}\operatorname{diag}(1/\nu_{\text{prev}})`, using the
    **target** marginal :math:`\nu` in the outgoing correction (the reference code divides by
    :math:`\mu`, which is wrong when the marginals differ).  Transport maps are rectangular, so
    the models may have different widths.  The output level is aligned by the identity.  The
    fused model has the anchor's architecture and widths and holds the plain mean of the anchor's
    and the aligned models' parameters, :math:`\frac1N\sum_k \widetilde W_k`.

    Residual levels (an identity skip: ``level.adds_input = True``, or a residual block with
    ``branch`` and an ``nn.Identity`` ``shortcut`` such as the zoo's ResNet blocks) share one
    transport with the level they add to: the whole stream is aligned with a single map whose
    ground metric is the sum of the ground metrics at every level of the stream (and whose
    marginals average the normalised scores of those levels).  A stream that starts at the input
    or reaches the output uses the identity.  The inner layers of a level (a block's first
    convolution, or a projection shortcut reading the level input) are aligned too: each inner
    neuron space gets its own transport, computed the same way from the inner pre-activations
    (captured with a forward hook) with uniform marginals, since importance scores are defined
    for level outputs only.  Per-channel normalisations (BatchNorm, including running
    statistics) follow the neurons they normalise.

    After fusing, :attr:`transports` holds, for every model ``k >= 1``, the list of transport
    plans per level (``None`` for identity levels) and :attr:`groupings` the per-level matching
    matrices ``[identity, Q_1, ..., Q_{N-1}]`` used by :func:`neurofuse.repair.repair`.

    References
    ----------
    Singh, S. P., & Jaggi, M. (2020). Model Fusion via Optimal Transport. NeurIPS 2020.
    """

    summary = "OTFusion (Singh & Jaggi 2020): OT alignment to model 0 on activations, then average"
    Options = OTFusionOptions
    uses_importance = True
    min_models = 1

    def _fuse(self, models: List[nn.Module], data: Optional[FusionSet]) -> nn.Module:
        assert data is not None
        nets = check_same_levels(models)
        layouts, heads = check_alignable(nets, self.name)
        anchor = nets[0]
        widths = [m.level_widths() for m in nets]
        self._score_cache: Dict[Tuple[int, int], np.ndarray] = {}
        self.transports: List[List[Optional[np.ndarray]]] = []
        maps_per_model: List[List[Optional[NeuronMap]]] = []
        states = [anchor.state_dict()]
        for k in tqdm(range(1, len(nets)), desc="otfusion align", disable=not self.progress, leave=False):
            params, maps = self._align(nets[k], anchor, layouts, heads, widths, data)
            maps_per_model.append(maps)
            self.transports.append([None if m is None else m.plan for m in maps])
            sd: Dict[str, Tensor] = {}
            for i, p in enumerate(params):
                sd.update({f"levels.{i}.{key}": v for key, v in p.items()})
            states.append(sd)
        fused = anchor.clone()
        ref = fused.state_dict()
        own = [net.state_dict() for net in nets]
        avg = {}
        for key, v in ref.items():
            if v.is_floating_point():
                # tensors outside the levels (none in the zoo) are averaged as they are when their
                # shapes agree, and otherwise taken from the anchor
                vals = [s[key] if key in s else (own[i][key] if own[i][key].shape == v.shape else v)
                        for i, s in enumerate(states)]
                avg[key] = torch.stack([t.double() for t in vals]).mean(0).to(v.dtype)
            else:
                avg[key] = v.clone()
        fused.load_state_dict(avg)
        # matching matrices for REPAIR: row j of Q_k averages model k's neurons matched to j
        self.groupings: List[List[np.ndarray]] = []
        for lvl in range(anchor.num_levels - 1):
            mats = [np.eye(widths[0][lvl])]
            for k, maps in enumerate(maps_per_model, start=1):
                m = maps[lvl]
                mats.append(np.eye(widths[k][lvl]) if m is None else m.out.numpy())
            self.groupings.append(mats)
        return fused

    # -- alignment of one model to the anchor -----------------------------------------------
    def _align(self, model: LeveledNet, anchor: LeveledNet, layouts: List[LevelLayout],
               heads: List[int], widths: List[List[int]], data: FusionSet
               ) -> Tuple[List[Dict[str, Tensor]], List[Optional[NeuronMap]]]:
        n_levels = anchor.num_levels
        pair = [model.level_widths(), anchor.level_widths()]
        outs: List[Optional[NeuronMap]] = [None] * n_levels
        params: List[Dict[str, Tensor]] = []
        # inputs of the current level for every fusion batch: of the aligned model k (its levels
        # below already aligned, so its activations follow the alignment) and of the anchor
        with torch.no_grad():
            h_k = [xb for xb, _ in data.batches(self.device)]
        h_a = list(h_k)
        for lvl in range(n_levels):
            layout = layouts[lvl]
            head = heads[lvl]
            members = stream_members(heads, head)
            known = True  # the output map is fixed before the level's inner layers are aligned
            if lvl == n_levels - 1 or head == -1 or n_levels - 1 in members:
                why = "output level" if lvl == n_levels - 1 else "residual stream tied to the input or output"
                identity_ok(pair, lvl, why)
            elif head < lvl:
                outs[lvl] = outs[head]  # identity skip: the output neurons are the input neurons
            else:
                known = False
            maps: SpaceMaps = {"in": outs[lvl - 1] if lvl > 0 else None, "out": outs[lvl]}
            for sp in layout.internal:  # inner layers of the level (e.g. a residual block's)
                partial = align_level(model.levels[lvl], layout, lvl, maps)
                maps[sp.name] = self._transport(model, anchor, h_k, h_a, partial, lvl, [lvl], data, sp)
            if not known:
                partial = align_level(model.levels[lvl], layout, lvl, maps)
                outs[lvl] = self._transport(model, anchor, h_k, h_a, partial, lvl, members, data, None)
            maps["out"] = outs[lvl]
            params.append(align_level(model.levels[lvl], layout, lvl, maps))
            if lvl < n_levels - 1:
                with torch.no_grad():
                    h_k = [functional_call(model.levels[lvl], params[lvl], (h,)) for h in h_k]
                    h_a = [anchor.levels[lvl](h) for h in h_a]
        return params, outs

    def _transport(self, model: LeveledNet, anchor: LeveledNet, h_k: List[Tensor], h_a: List[Tensor],
                   partial: Dict[str, Tensor], lvl: int, members: List[int], data: FusionSet,
                   space: Optional[Space]) -> NeuronMap:
        """Transport of level ``lvl``'s output (over its stream ``members``), or of its internal
        ``space``, from model ``k`` (inputs ``h_k`` from its aligned levels, ``partial`` at
        ``lvl``) to the anchor (inputs ``h_a``)."""
        stats = [_PairStats() for _ in members]
        if space is not None:
            point_k = dict(model.levels[lvl].named_modules())[space.point]
            point_a = dict(anchor.levels[lvl].named_modules())[space.point]
        with torch.no_grad():
            for h, ha in zip(h_k, h_a):
                if space is not None:
                    z = capture(point_k, lambda: functional_call(model.levels[lvl], partial, (h,)))
                    za = capture(point_a, lambda: anchor.levels[lvl](ha))
                    stats[0].update(flatten_neurons(z, model.axes[lvl]), flatten_neurons(za, anchor.axes[lvl]))
                    continue
                z = functional_call(model.levels[lvl], partial, (h,))
                za = anchor.levels[lvl](ha)
                for s, m in zip(stats, members):
                    if m > lvl:  # rest of the stream, in model k's basis (not yet aligned)
                        z = model.levels[m](z)
                        za = anchor.levels[m](za)
                    s.update(flatten_neurons(z, model.axes[m]), flatten_neurons(za, anchor.axes[m]))
        cost = np.zeros_like(stats[0].sq_dist())
        for s in stats:
            d = s.sq_dist()
            cost += d if self.options.ground_metric == "sqeuclidean" else np.sqrt(d)
        if space is not None:  # importance is defined for level outputs only
            mu, nu = np.full(cost.shape[0], 1.0 / cost.shape[0]), np.full(cost.shape[1], 1.0 / cost.shape[1])
        else:
            mu = normalized(sum(normalized(self._scores(model, m, data)) for m in members))
            nu = normalized(sum(normalized(self._scores(anchor, m, data)) for m in members))
        plan = self._solve(mu, nu, cost, lvl)
        log.debug("otfusion level %d%s: transport cost %.4g", lvl,
                  f" ({space.name})" if space is not None else "", float((plan * cost).sum()))
        return NeuronMap.from_plan(plan, nu)

    def _scores(self, net: LeveledNet, level: int, data: FusionSet) -> np.ndarray:
        key = (id(net), level)
        if key not in self._score_cache:
            self._score_cache[key] = neuron_importance(
                net, level, data, self.importance, self.device).cpu().numpy()
        return self._score_cache[key]

    def _solve(self, mu: np.ndarray, nu: np.ndarray, cost: np.ndarray, level: int) -> np.ndarray:
        import ot

        scale = float(cost.max())
        c = cost / scale if scale > 0 else cost
        if self.options.solver == "exact":
            plan, info = ot.emd(mu, nu, c, numItermax=self.options.max_iter, log=True)
            if info.get("warning"):
                raise ConfigError(
                    f"exact OT did not converge at level {level} ({info['warning']}); raise "
                    "max_iter or use solver='sinkhorn'"
                )
        else:
            plan = ot.sinkhorn(mu, nu, c, self.options.reg, method="sinkhorn_log",
                               numItermax=self.options.max_iter, stopThr=1e-9, warn=False)
        plan = np.asarray(plan, dtype=np.float64)
        if not np.isfinite(plan).all() or plan.sum() <= 0:
            raise ConfigError(
                f"the OT solver returned an invalid plan at level {level}; raise reg or use "
                "solver='exact'"
            )
        return plan
