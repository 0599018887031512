r"""Closed-form fusion of transformers, sub-level by sub-level (the ``hf-linear`` / ``kf-linear``
path for levels described by :mod:`neurofuse.levels._transformer`).

A transformer's residual stream is one neuron space through the network, so its neurons are
grouped **once**: the base models' stream neurons are clustered (K-means, or Hungarian matching
for ``hf-linear``) on their values at every point of the stream (after the embeddings and after
every attention and MLP sub-block), and every stream target is the weighted centre of a group,
:math:`t_c = \sum_{j \in c} s_j a_j / \sum_{j\in c} s_j`.  Then every level is fitted from the
*fused* model's own inputs, stage by stage (:class:`TransformerFit`):

========================  ====================================================================
sub-level                 treatment
========================  ====================================================================
embeddings (shared input) the weighted centres of the base models' rows (exact: the input is
                          shared, so this *is* the least-squares fit); a post-LayerNorm (BERT)
                          per neuron from the normalised sum
CLS token, position       per position, the mean over samples of target minus tokens
queries, keys, values     heads matched as units across models (cost: within-head matching
                          cost of the queries and keys plus that of the values); inside each
                          fused head the member neurons are grouped (queries and keys share one
                          grouping); queries and keys are then least squares fits to their
                          grouped outputs from the fused normalised input (the pre-LayerNorm's
                          affine folded in).  The attention *pattern* is not affine in them: it
                          is whatever the fitted queries and keys give
value projection          given the fused attention pattern :math:`P_b` of head :math:`b`, the
                          head's context :math:`P_b h W_v^\top + b_v` is affine in
                          :math:`(W_v, b_v)`: least squares on the design :math:`[P_b h, 1]` to
                          the grouped base contexts
attention output          least squares to the residual target: the grouped next stream minus
                          the fused stream (pre-norm), or the grouped pre-norm sum minus the
                          fused stream (post-norm)
MLP first layer           least squares on the fused normalised stream (LayerNorm's affine
                          folded in) to the grouped base hidden pre-activations
MLP second layer          least squares on the fused hidden activations to the residual target
post-LayerNorm            weight and bias per neuron, from the fused normalised sum to the
                          grouped base stream
head                      LayerNorm's affine folded into the (pooler and) classifier, least
                          squares to the grouped pooler pre-activations and the output target
========================  ====================================================================

A plain level that heads a stream (timm's patch convolution) is fitted by the usual closed form
with the stream's grouping.  The groupings of the inner spaces (heads, MLP hidden neurons, the
pooler) are not level outputs, so they use uniform importance.

Every least-squares fit above solves with the method's ``rtol``, ``ridge`` and ``prior`` options
(:meth:`~neurofuse.approximation.LinearStats.solve`): with ``ridge="auto"`` (the default) each
projection's penalty is chosen by generalised cross-validation from its own statistics, a row
being one token of one sample (:mod:`neurofuse.approximation._ridge`).  The per-neuron LayerNorm
fits (one slope and intercept per neuron, :class:`~neurofuse.approximation.NeuronRegression`) are
one-dimensional and keep their own rule: slope 0 where the input does not vary.  The level's
report lists every fit's penalty and condition number (``penalties``, ``conditions``); unlike a
plain level's, they raise no warning.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from .._loop import run_epochs
from ..approximation import (GramStats, LinearStats, NeuronRegression, TokenSums, fold_layernorm,
                             reset_layernorm)
from ..errors import IncompatibleModelsError
from ..grouping import Grouping, block_matching_costs
from ..importance import normalize_scores
from ..levels import LeveledNet, LevelStream, flatten_neurons
from ..levels._transformer import (
    MLP,
    POOL_TOKEN,
    Affix,
    Attention,
    Embed,
    Head,
    Norm,
    Proj,
    StreamNorm,
    TransformerSpec,
    _pool,
    activation,
    affix_forward,
    attention_parts,
    attention_pattern,
    describe,
    embed_forward,
    heads_attention,
    mlp_parts,
    stage_forward,
    tensor_of,
)

__all__ = ["JOINT_VALUE_COLUMNS", "TransformerFit", "closed_form_reason"]

log = logging.getLogger("neurofuse")

#: the largest design (``heads x stream width + 1`` columns) for which the values are fitted
#: jointly with the output projection to the residual target (:meth:`TransformerFit._values_jointly`;
#: its Gram matrix is that size squared: 4097 columns are 134 MB in float64, a ViT-S/16 has
#: 6 x 384 + 1 = 2305); wider attention fits its values head by head to the grouped contexts
JOINT_VALUE_COLUMNS = 4097


def closed_form_reason(net: nn.Module, index: int) -> Optional[str]:
    """``None`` if level ``index`` is a transformer level the block fit handles (an embedding
    first, a head last, blocks that read and write the stream in between), else why not."""
    spec = describe(net.levels[index])  # type: ignore[index]
    if spec is None:
        return "it is not a transformer level"
    n = len(net.levels)  # type: ignore[arg-type]
    if not spec.writes_stream and index != n - 1:
        return "a transformer head must be the last level"
    if not spec.reads_stream and index != 0:
        return "transformer embeddings must be the first level"
    if spec.reads_stream and spec.writes_stream and index == 0:
        return "the residual stream has no level that starts it"
    return None


@dataclasses.dataclass
class StreamGrouping:
    """The grouping of one residual stream and, per base model, its ``[n_i, k]`` combiner:
    ``values_i @ C_i`` summed over the models is the weighted centre of every group."""

    grouping: Grouping
    widths: List[int]
    combiners: List[Tensor]
    labels: List[Tensor]

    @classmethod
    def of(cls, grouping: Grouping, widths: Sequence[int], device: torch.device) -> "StreamGrouping":
        labels = torch.from_numpy(grouping.labels).long()
        w = torch.from_numpy(np.asarray(grouping.weights, dtype=np.float64))
        den = torch.zeros(grouping.k, dtype=torch.float64).index_add_(0, labels, w)
        coef = w / den[labels].clamp_min(torch.finfo(torch.float64).tiny)
        combiners, start = [], 0
        for n in widths:
            c = torch.zeros(n, grouping.k, dtype=torch.float64)
            c[torch.arange(n), labels[start:start + n]] = coef[start:start + n]
            combiners.append(c.to(device))
            start += n
        return cls(grouping, list(widths), combiners, list(torch.split(labels, list(widths))))

    def target(self, values: Sequence[Tensor]) -> Tensor:
        """The grouped values (float64): ``sum_i values_i @ C_i`` along the last axis."""
        return sum(v.double() @ c for v, c in zip(values, self.combiners))  # type: ignore[return-value]

    def rows(self, tensors: Sequence[Tensor]) -> Tensor:
        """Per-neuron rows (axis 0) of every model's tensor combined: ``sum_i C_i^T t_i``."""
        return sum(torch.tensordot(c.T, t.double(), dims=([1], [0])) for t, c in zip(tensors, self.combiners))  # type: ignore[return-value]


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def _design(h: Tensor, bias: bool) -> Tensor:
    """The rows of ``h`` (and a ones column with ``bias``), in ``h``'s dtype: the statistics
    convert them to float64 chunk by chunk and weigh them (:meth:`LinearStats.update`, with
    :func:`_scale`)."""
    x = h if h.is_floating_point() else h.double()
    if bias:
        x = torch.cat([x, torch.ones_like(x[..., :1])], -1)
    return _flat(x)


def _scale(t: Tensor, weights: Optional[Tensor]) -> Optional[Tensor]:
    """The square roots of the row weights of token tensor ``t`` flattened (weighted least
    squares; ``None``: all rows alike)."""
    w = _row_weights(t, weights)
    return None if w is None else w.sqrt()


def _group_mean(columns: Tensor, weights: Tensor, labels: Tensor, k: int) -> Tensor:
    """``[d, k]`` the ``weights``-weighted mean of the ``columns`` (``[d, M]``) of every group in
    ``labels`` (columns of weight zero take no part; a group without weight is zero)."""
    w = weights.to(columns.device, columns.dtype)
    lab = labels.to(columns.device)
    den = torch.zeros(k, dtype=w.dtype, device=w.device).index_add_(0, lab, w)
    num = torch.zeros(columns.shape[0], k, dtype=w.dtype, device=w.device).index_add_(1, lab, columns * w)
    return num / den.clamp_min(torch.finfo(w.dtype).tiny)


def _weighted(t: Tensor, weights: Optional[Tensor]) -> Tensor:
    """Token tensor ``[B, T, C]`` rows scaled by ``sqrt(weights[T])`` (others unchanged)."""
    if weights is None or t.dim() != 3 or t.shape[1] != len(weights):
        return t
    return t * weights.sqrt().to(t.device, t.dtype)[None, :, None]


def _row_weights(t: Tensor, weights: Optional[Tensor]) -> Optional[Tensor]:
    if weights is None or t.dim() != 3 or t.shape[1] != len(weights):
        return None
    return weights.to(t.device).double()[None, :].expand(t.shape[0], -1).reshape(-1)


def _normalised(norm: Optional[Norm], x: Tensor) -> Tensor:
    return x if norm is None else F.layer_norm(x, (x.shape[-1],), None, None, norm.eps)


def _write(level: nn.Module, key: Optional[str], value: Tensor, start: int = 0, stop: Optional[int] = None) -> None:
    if key is None:
        return
    t = tensor_of(level, key)
    with torch.no_grad():
        t[start:stop].copy_(value.to(t.dtype).reshape(t[start:stop].shape))


def _write_rows(level: nn.Module, p: Proj, value: Tensor, start: int, stop: int) -> None:
    """Weight rows ``[start, stop)`` of projection ``p`` (``[rows, in]``; columns of a weight
    stored ``[in, out]``)."""
    t = tensor_of(level, p.weight)
    view = p.oriented(t)[start:stop]
    with torch.no_grad():
        view.copy_(value.to(t.dtype).reshape(view.shape))


def _write_proj(level: nn.Module, p: Proj, w: Tensor, bias: bool, row0: int = 0) -> None:
    """Rows ``row0..`` of projection ``p`` from solved weights ``w`` ``[d, rows]`` (bias last)."""
    rows = w.shape[1]
    start = p.start + row0
    _write_rows(level, p, (w[:-1] if bias else w).T, start, start + rows)
    if bias:
        _write(level, p.bias, w[-1], start, start + rows)


def _identity_norm(level: nn.Module, norm: Optional[Norm]) -> None:
    """A LayerNorm whose affine was folded into the layers it feeds: weight 1, bias 0."""
    if norm is not None:
        reset_layernorm(tensor_of(level, norm.weight) if norm.weight else None,
                        tensor_of(level, norm.bias) if norm.bias else None)


def _getter(level: nn.Module):  # type: ignore[no-untyped-def]
    """The level's tensors by key, read when asked (so fitted values are seen)."""
    return lambda key: tensor_of(level, key)


def _rows_of(level: nn.Module, p: Proj) -> int:
    return int(p.matrix(tensor_of(level, p.weight)).shape[0])


def _prior(level: nn.Module, p: Proj, labels: Optional[Tensor], k_in: int, norm: Optional[Norm],
           bias: bool) -> Tensor:
    r"""A base projection's weights ``[d, rows]`` in the fused design's coordinates: the
    LayerNorm ``norm`` it reads folded in (:math:`W\operatorname{diag}\gamma`,
    :math:`b + W\beta`), and its input neuron :math:`j` added to fused input ``labels[j]`` (the
    convention of :func:`neurofuse.approximation.aligned_prior`); the bias last when ``bias``."""
    w, b = fold_layernorm(p.matrix(tensor_of(level, p.weight)),
                          None if p.bias is None else p.rows(tensor_of(level, p.bias)),
                          tensor_of(level, norm.weight) if norm is not None and norm.weight else None,
                          tensor_of(level, norm.bias) if norm is not None and norm.bias else None)
    if labels is not None:
        w = torch.zeros(w.shape[0], k_in, dtype=w.dtype, device=w.device).index_add_(1, labels.to(w.device), w)
    if bias:
        w = torch.cat([w, b[:, None]], 1)
    return w.T


class TransformerFit:
    """The closed-form fit of the transformer levels of one fusion call.

    Made by :class:`~neurofuse.methods.LinearFusion` when the fused model has transformer levels;
    :meth:`fit_level` fits a transformer level in place and :meth:`stream_grouping` gives the
    grouping of a plain level that starts a stream.
    """

    def __init__(self, method: Any, run: Any, models: List[LeveledNet], fused: LeveledNet) -> None:
        self.method, self.run, self.models, self.fused = method, run, models, fused
        self.device = method.device
        self.specs: List[Optional[TransformerSpec]] = [describe(lv) for lv in fused.levels]
        self.base_specs = [[describe(lv) for lv in m.levels] for m in models]
        heads: List[int] = []
        for i, spec in enumerate(self.specs):
            tied = spec is not None and spec.reads_stream and spec.writes_stream and i > 0
            heads.append(heads[i - 1] if tied else i)
        self.heads = heads
        self.streams: Dict[int, StreamGrouping] = {}
        self.tw = self._token_weights()
        #: the diagnostics of the current level's least-squares fits (:meth:`_solve`)
        self._fits: List[Any] = []

    def _token_weights(self) -> Optional[Tensor]:
        r"""Weights of the token rows in every fit: when the head reads one token alone (a CLS
        token, or a decoder's last token), that token weighs as much as all the others together
        (:math:`T - 1`), since the output depends on the stream through it; ``None`` (all alike)
        otherwise."""
        last = self.specs[-1]
        if last is None or not isinstance(last.stages[-1], Head) or POOL_TOKEN[last.stages[-1].pool] is None:
            return None
        tokens = [s[1] for s, a in zip(self.fused.level_shapes(), self.fused.axes) if a == "token"]
        if not tokens or len(set(tokens)) != 1 or tokens[0] < 2:
            return None
        w = torch.ones(tokens[0], dtype=torch.float64)
        w[POOL_TOKEN[last.stages[-1].pool]] = tokens[0] - 1
        return w

    @staticmethod
    def applies(fused: LeveledNet) -> bool:
        return any(describe(lv) is not None for lv in fused.levels)

    def handles(self, level: int) -> bool:
        return self.specs[level] is not None

    def members(self, head: int) -> List[int]:
        return [i for i, h in enumerate(self.heads) if h == head]

    def starts_stream(self, level: int) -> bool:
        """Whether ``level`` heads a residual stream that transformer levels continue."""
        spec = self.specs[level]
        if spec is not None and not spec.writes_stream:
            return False
        return self.heads[level] == level and (len(self.members(level)) > 1 or spec is not None)

    # -- the stream's grouping -------------------------------------------------------------
    def stream_grouping(self, level: int, stream: LevelStream, k: int) -> Grouping:
        """Group the stream that starts at ``level`` (once), from every base model's values at
        every point of the stream; record it as the correspondence of every hidden level of it."""
        if level in self.streams:
            return self.streams[level].grouping
        run, models = self.run, self.models
        members = self.members(level)
        gram = GramStats()
        with torch.no_grad():
            for b in stream:
                points: List[List[Tensor]] = []
                for i, m in enumerate(models):
                    vals = self._stream_points(i, members, b.inputs[i + 1])
                    for p, v in enumerate(vals):
                        if len(points) <= p:
                            points.append([])
                        points[p].append(v)
                for vs in points:
                    gram.update(vs)
        feats = self.method.reduce(gram).coordinates().float().to(self.device)
        widths = [bw[level] for bw in run.base_widths]
        scores = np.zeros(sum(widths))
        for lvl in members:
            raw = np.split(self.method.level_scores(run, models, lvl), np.cumsum(widths)[:-1])
            scores += np.concatenate([normalize_scores(torch.from_numpy(s)).numpy() for s in raw])
        grouping = self.method.group(feats, scores, widths, k, level)
        self.streams[level] = StreamGrouping.of(grouping, widths, self.device)
        last = self.fused.num_levels - 1
        for lvl in members:
            if lvl < last:
                run.record(lvl, grouping.correspondence(widths))
        return grouping

    def _stream_points(self, i: int, members: List[int], x: Tensor) -> List[Tensor]:
        """Model ``i``'s stream values ``[rows, n_i]`` at every point of the levels ``members``."""
        m = self.models[i]
        out: List[Tensor] = []
        for lvl in members:
            spec = self.base_specs[i][lvl]
            if spec is None:
                x = m.levels[lvl](x)
                out.append(flatten_neurons(x, m.axes[lvl]))
                continue
            level = m.levels[lvl]
            get = spec.getter(level)
            h = x.transpose(0, 1) if spec.seq_first else x
            for st in _batch_first(spec):
                if isinstance(st, Attention):
                    parts = attention_parts(st, get, h)
                elif isinstance(st, MLP):
                    parts = mlp_parts(st, level, get, h)
                else:
                    parts = {"out": stage_forward(st, level, get, h)}
                if "sum" in parts and getattr(st, "post", None) is not None:
                    out.append(_flat(_weighted(parts["sum"], self.tw)))
                h = parts["out"]
                out.append(_flat(_weighted(h, self.tw)))
            x = h.transpose(0, 1) if spec.seq_first else h
        return out

    # -- one level ---------------------------------------------------------------------------
    def fit_level(self, level: int, stream: LevelStream, k: int) -> None:
        """Fit transformer level ``level`` of the fused model, stage by stage, and move the
        stream past it."""
        spec = self.specs[level]
        assert spec is not None
        if spec.writes_stream and self.heads[level] == level:
            self.stream_grouping(level, stream, k)
        group = self.streams.get(self.heads[level]) if spec.writes_stream else None
        fl = self.fused.levels[level]
        bl = [m.levels[level] for m in self.models]
        bspecs = [s[level] for s in self.base_specs]
        for i, s in enumerate(bspecs):
            if s is None or [type(x) for x in s.stages] != [type(x) for x in spec.stages]:
                raise IncompatibleModelsError(
                    f"level {level} of model {i} does not have model 0's transformer stages; the "
                    "closed form fuses transformers of one architecture (widths may differ)")
        xf: List[Tensor] = []
        xb: List[List[Tensor]] = [[] for _ in self.models]
        for b in stream:
            xf.append(b.inputs[0].transpose(0, 1) if spec.seq_first else b.inputs[0])
            for i in range(len(self.models)):
                x = b.inputs[i + 1]
                xb[i].append(x.transpose(0, 1) if spec.seq_first else x)
        stages, bstages = _batch_first(spec), [_batch_first(s) for s in bspecs]  # type: ignore[arg-type]
        info: Dict[str, Any] = {"level": level, "stages": [type(s).__name__ for s in stages]}
        self._fits = []
        #: per batch, every base model's intermediate values of the stage just fitted (attention
        #: and MLP stages keep them: their "out" is the stream after the stage, not recomputed)
        self._base_out: Optional[List[List[Dict[str, Tensor]]]] = None
        #: per batch, the grouped base outputs of that stage (the stream's targets after it)
        self._stage_targets: Optional[List[Tensor]] = None
        for si, st in enumerate(stages):
            bst = [s[si] for s in bstages]
            if isinstance(st, Embed):
                self._embed(fl, st, bl, bst, xf, xb, group)  # type: ignore[arg-type]
            elif isinstance(st, Affix):
                self._affix(fl, st, bl, bst, xf, xb, group)  # type: ignore[arg-type]
            elif isinstance(st, Attention):
                info[f"heads{st.index}"] = self._attention(level, fl, st, bl, bst, xf, xb, group).tolist()  # type: ignore[arg-type]
            elif isinstance(st, MLP):
                self._mlp(level, fl, st, bl, bst, xf, xb, group)  # type: ignore[arg-type]
            elif isinstance(st, StreamNorm):
                self._stream_norm(fl, st, bl, bst, xf, xb, group)  # type: ignore[arg-type]
            else:
                self._head(level, fl, st, bl, bst, xf, xb)  # type: ignore[arg-type]
            with torch.no_grad():
                getf = spec.getter(fl)
                xf = [stage_forward(st, fl, getf, x) for x in xf]
                if self._base_out is not None:   # the base stages' outputs, kept by the fit
                    xb = [[parts[i]["out"] for parts in self._base_out] for i in range(len(xb))]
                    self._base_out = None
                else:
                    for i, s in enumerate(bspecs):
                        get = s.getter(bl[i])  # type: ignore[union-attr]
                        xb[i] = [stage_forward(bst[i], bl[i], get, x) for x in xb[i]]
                if group is not None:  # how far the fused stream is from its targets after the stage
                    tg = self._stage_targets or [group.target([v[j] for v in xb]) for j in range(len(xf))]
                    info.setdefault("stream_error", []).append(_relative_error(xf, tg))
                self._stage_targets = None
        # per least-squares fit, in order: the ridge chosen (relative) and the condition number
        info["penalties"] = [f.penalty for f in self._fits]
        info["conditions"] = [f.condition for f in self._fits]
        self.run.report.append(info)
        if group is not None:
            self.run.prev_labels = np.split(group.grouping.labels, np.cumsum(group.widths)[:-1])
            self.run.prev_k = group.grouping.k
        if level < self.fused.num_levels - 1:
            back = (lambda t: t.transpose(0, 1)) if spec.seq_first else (lambda t: t)
            for b in stream:
                b.keep(0, back(xf[b.index]))
                for i in range(len(self.models)):
                    b.keep(i + 1, back(xb[i][b.index]))
            stream.advance({0: fl, **{i + 1: lv for i, lv in enumerate(bl)}})

    # -- least squares helpers --------------------------------------------------------------
    def _solve(self, stats: LinearStats, prior: Optional[Tensor] = None) -> Any:
        """The least-squares solution with the method's ``rtol`` and ``ridge`` (``"auto"``: GCV on
        these statistics); input directions the fusion set does not excite keep the base models'
        weights (``prior``, when the method's ``prior`` option is on)."""
        opts = self.method.options
        sol = self.method.reduce(stats).solve(opts.rtol, opts.ridge, prior.to(self.device) if (
            prior is not None and opts.prior) else None)
        if sol.diagnostics is not None:
            self._fits.append(sol.diagnostics)
        return sol

    def _group_inner(self, feats: Tensor, widths: Sequence[int], k: int, level: int) -> Grouping:
        """Group inner neurons (not a level output: uniform importance)."""
        return self.method.group(feats.float(), np.ones(int(sum(widths))), list(widths), k, level)

    def _fit_residual(self, level: nn.Module, p: Proj, inputs: List[Tensor], targets: List[Tensor],
                      prior: Optional[Tensor] = None) -> None:
        """Least squares of projection ``p`` on its ``inputs`` to ``targets`` (no grouping)."""
        stats = LinearStats()
        for h, t in zip(inputs, targets):
            stats.update(_design(h, p.bias is not None), _flat(t), _scale(h, self.tw))
        _write_proj(level, p, self._solve(stats, prior).weights, p.bias is not None)

    def _residual_prior(self, bl: List[nn.Module], projs: List[Proj], labels: List[Tensor], k_in: int,
                        bias: bool, combine: List[Tensor]) -> Tensor:
        """The weighted centre of the base projections' rows (``combine[i]``: ``[rows_i, k]``),
        their inputs mapped to the fused inputs ``labels``: the prior of a residual fit."""
        return sum(_prior(lv, p, lab, k_in, None, bias) @ c.to(torch.float64)  # type: ignore[return-value]
                   for lv, p, lab, c in zip(bl, projs, labels, combine))

    def _fit_norm(self, level: nn.Module, norm: Norm, inputs: List[Tensor], targets: List[Tensor]) -> None:
        """A LayerNorm's weight and bias per neuron, from the normalised ``inputs`` to ``targets``."""
        reg = NeuronRegression()
        for x, t in zip(inputs, targets):
            reg.update(_flat(_normalised(norm, x)), _flat(t), _row_weights(x, self.tw))
        gamma, beta = self.method.reduce(reg).solve()
        if norm.weight:
            _write(level, norm.weight, gamma)
        else:
            beta = reg.sy / reg.count - reg.sx / reg.count
        if norm.bias:
            _write(level, norm.bias, beta)

    # -- the stages --------------------------------------------------------------------------
    def _embed(self, fl: nn.Module, st: Embed, bl: List[nn.Module], bst: List[Embed], xf: List[Tensor],
               xb: List[List[Tensor]], group: StreamGrouping) -> None:
        """The input is shared, so the weighted centres of the base rows are the exact fit."""
        gets = [_getter(lv) for lv in bl]
        if st.kind == "lookup":    # a table [V, C]: the stream is its last axis
            _write(fl, st.proj.weight, group.target([g(s.proj.weight) for g, s in zip(gets, bst)]))
        else:                      # a projection: the stream is its rows
            _write(fl, st.proj.weight, group.rows([g(s.proj.weight) for g, s in zip(gets, bst)]))
            if st.proj.bias:
                _write(fl, st.proj.bias, group.rows([g(s.proj.bias) for g, s in zip(gets, bst)]))  # type: ignore[arg-type]
        for name in ("cls", "pos"):
            if getattr(st, name):
                _write(fl, getattr(st, name), group.target([g(getattr(s, name)) for g, s in zip(gets, bst)]))
        for r, key in enumerate(st.rows):
            _write(fl, key, group.target([g(s.rows[r]) for g, s in zip(gets, bst)]))
        if st.norm is not None:
            getf = _getter(fl)
            with torch.no_grad():
                sums = [embed_forward(st, fl, getf, x, pre_norm=True) for x in xf]
                tgt = [group.target([embed_forward(s, lv, g, xb[i][j]) for i, (s, lv, g) in enumerate(zip(bst, bl, gets))])
                       for j in range(len(xf))]
            self._fit_norm(fl, st.norm, sums, tgt)

    def _affix(self, fl: nn.Module, st: Affix, bl: List[nn.Module], bst: List[Affix], xf: List[Tensor],
               xb: List[List[Tensor]], group: StreamGrouping) -> None:
        gets = [_getter(lv) for lv in bl]
        sums = TokenSums()
        with torch.no_grad():
            for j, x in enumerate(xf):
                tok = affix_forward(Affix(st.flatten), lambda k: None, x).double()  # type: ignore[arg-type,return-value]
                if st.cls:
                    tok = torch.cat([torch.zeros_like(tok[:, :1]), tok], 1)
                tgt = group.target([affix_forward(s, g, xb[i][j]) for i, (s, g) in enumerate(zip(bst, gets))])
                sums.update(tgt - tok)
        mean = self.method.reduce(sums).mean()                    # [T, k]
        if st.pos:
            pos = mean.clone()
            if st.cls:
                pos[0] = group.target([g(st.pos)[0, 0] for g in gets])
                _write(fl, st.cls, mean[0] - pos[0])
            _write(fl, st.pos, pos)
        elif st.cls:
            _write(fl, st.cls, mean[0])

    def _attention(self, level: int, fl: nn.Module, st: Attention, bl: List[nn.Module], bst: List[Attention],
                   xf: List[Tensor], xb: List[List[Tensor]], group: Optional[StreamGrouping]) -> np.ndarray:
        """Fit an attention sub-block; returns ``sigma`` ``[N, H]``: model ``i``'s head in fused head ``b``."""
        assert group is not None
        heads = st.heads
        for i, s in enumerate(bst):
            if s.heads != heads:
                raise IncompatibleModelsError(
                    f"level {level}: model {i} has {s.heads} attention heads, model 0 has {heads}; heads "
                    "are fused as units, so the models need the same number of heads")
        getf = _getter(fl)
        gets = [_getter(lv) for lv in bl]
        nq = [_rows_of(lv, s.q) for lv, s in zip(bl, bst)]
        nv = [_rows_of(lv, s.v) for lv, s in zip(bl, bst)]
        nq_f, nv_f = _rows_of(fl, st.q), _rows_of(fl, st.v)
        dq, dv = [n // heads for n in nq], [n // heads for n in nv]
        dq_f, dv_f = nq_f // heads, nv_f // heads
        bias_qk, bias_v = st.q.bias is not None, st.v.bias is not None
        # 1. queries, keys, values of every model on the fused normalised input
        stats = LinearStats()
        base_parts: List[List[Dict[str, Tensor]]] = []
        with torch.no_grad():
            for j, x in enumerate(xf):
                h = _normalised(st.pre, x)
                parts = [attention_parts(s, g, xb[i][j]) for i, (s, g) in enumerate(zip(bst, gets))]
                base_parts.append(parts)
                stats.update(_design(h, bias_qk), [_flat(p[n]) for p in parts for n in ("q", "k", "v")],
                             _scale(h, self.tw))
        k_in = int(xf[0].shape[-1])
        priors = [torch.cat([_prior(lv, getattr(s, n), group.labels[i], k_in, s.pre, bias_qk if n != "v" else bias_v)
                             for n in ("q", "k", "v")], 1)
                  for i, (lv, s) in enumerate(zip(bl, bst))]
        sol = self._solve(stats, torch.cat(priors, 1) if bias_qk == bias_v else None)
        feats = sol.features.double()
        offs, start = [], 0
        for i in range(len(bst)):
            offs.append((start, start + nq[i], start + 2 * nq[i]))
            start += 2 * nq[i] + nv[i]
        qk = [torch.cat([feats[o[0]:o[0] + n], feats[o[1]:o[1] + n]], 1) for o, n in zip(offs, nq)]
        vv = [feats[o[2]:o[2] + n] for o, n in zip(offs, nv)]
        # 2. heads as units: every model's heads matched to model 0's (queries/keys + values)
        sigma = np.zeros((len(bst), heads), dtype=np.int64)
        sigma[0] = np.arange(heads)
        for i in range(1, len(bst)):
            cost = block_matching_costs(qk[i], qk[0], heads) + block_matching_costs(vv[i], vv[0], heads)
            rows, cols = linear_sum_assignment(cost)
            sigma[i, cols] = rows
        # 3. inside each fused head, queries and keys grouped together
        m_all = start
        wq, wk = torch.zeros(m_all, dtype=torch.float64), torch.zeros(m_all, dtype=torch.float64)
        lab = torch.zeros(m_all, dtype=torch.long)
        for b in range(heads):
            pts = torch.cat([qk[i][sigma[i, b] * dq[i]:(sigma[i, b] + 1) * dq[i]] for i in range(len(bst))], 0)
            g = self._group_inner(pts, dq, dq_f, level)
            pos = 0
            for i in range(len(bst)):
                a = int(sigma[i, b])
                for j in range(dq[i]):
                    cq, ck = offs[i][0] + a * dq[i] + j, offs[i][1] + a * dq[i] + j
                    lab[cq] = lab[ck] = b * dq_f + int(g.labels[pos])
                    wq[cq] = wk[ck] = float(g.weights[pos])
                    pos += 1
        if self.method.options.queries == "align":
            # the grouped base weights themselves, in the fused inputs' coordinates
            base = torch.cat(priors, 1)
            _write_proj(fl, st.q, _group_mean(base, wq, lab, nq_f), bias_qk)
            _write_proj(fl, st.k, _group_mean(base, wk, lab, nq_f), bias_qk)
        else:
            _write_proj(fl, st.q, sol.combine(wq, lab, nq_f), bias_qk)
            _write_proj(fl, st.k, sol.combine(wk, lab, nq_f), bias_qk)
        _identity_norm(fl, st.pre)
        # 4. values and the output projection, given the fused attention pattern
        with torch.no_grad():   # the grouped sums x + o(ctx): the residual target of values and o
            sums = [group.target([bp["sum"] for bp in parts]) for parts in base_parts]

        def values_and_output() -> None:
            o_prior = None
            if heads * k_in + 1 <= JOINT_VALUE_COLUMNS:
                self._values_jointly(fl, st, bl, bst, xf, sums, group, sigma, dq_f, dv_f)
            else:
                vo_labels = self._values_per_head(level, fl, st, xf, base_parts, sigma, priors, nq, dv, dq_f, dv_f)
                o_prior = self._residual_prior(bl, [s.o for s in bst], vo_labels, nv_f, st.o.bias is not None,
                                               group.combiners)
            inputs, targets = [], []
            with torch.no_grad():
                for j, x in enumerate(xf):
                    p = attention_parts(st, getf, x)
                    inputs.append(p["ctx"])
                    targets.append(sums[j] - x.double())
            self._fit_residual(fl, st.o, inputs, targets, o_prior)

        values_and_output()
        # 5. the queries and keys act through the softmax: gradient steps on the stage's residual
        #    target (option attention_steps), then the values and the output projection again
        if self.method.options.attention_steps:
            self._tune_queries(fl, st, xf, sums)
            values_and_output()
        # 6. a post-norm, per neuron
        outs = sums   # the grouped outputs of the stage (without a post-norm, its sums)
        if st.post is not None:
            with torch.no_grad():
                fused = [attention_parts(st, getf, x)["sum"] for x in xf]
                outs = [group.target([bp["out"] for bp in parts]) for parts in base_parts]
            self._fit_norm(fl, st.post, fused, outs)
        self._base_out, self._stage_targets = base_parts, outs
        return sigma

    def _tune_queries(self, fl: nn.Module, st: Attention, xf: List[Tensor], sums: List[Tensor]) -> None:
        r"""Adam steps on the fused queries and keys (their rows of a packed tensor only) that lower
        the stage's residual error :math:`\sum_t w_t \lVert x + o(\mathrm{attn}(x)) - s\rVert^2`
        over the fusion set (``sums``: the grouped targets :math:`s`; :math:`w_t` the token
        weights), the values and the output projection held fixed; distributed, the ranks' gradients
        and errors are summed, so every rank takes the same steps.  The attention pattern is not
        affine in the queries and keys, so their least-squares fit to the grouped base queries and
        keys only approximates the pattern; these steps fit it through the softmax, as kf-gradient
        does, from the closed form's start, and the best parameters seen are kept (the closed
        form's if no step lowers the error: at an exact fit Adam's normalised steps would only
        drift).  One step per pass over the fusion set, through :func:`neurofuse._loop.run_epochs`;
        step size: 1 % of the weights' RMS."""
        opts = self.method.options
        getf = _getter(fl)
        masks: Dict[int, Tensor] = {}
        params: Dict[int, Tensor] = {}
        for p in (st.q, st.k):
            for key, is_weight in ((p.weight, True), (p.bias, False)):
                if not key:
                    continue
                t = tensor_of(fl, key)
                mask = masks.setdefault(id(t), torch.zeros_like(t))
                params[id(t)] = t
                view = p.matrix(mask) if is_weight else p.rows(mask)
                view.fill_(1.0)
        weights = [p.matrix(tensor_of(fl, p.weight)).detach() for p in (st.q, st.k)]
        rms = float(torch.sqrt(sum((w.double() ** 2).sum() for w in weights) / sum(w.numel() for w in weights)))
        tensors = list(params.values())
        was = [t.requires_grad for t in tensors]
        opt = _MaskedAdam(tensors, masks, lr=0.01 * max(rms, 1e-12), distributed=self.method.distributed)
        targets = [t.to(xf[0].dtype) for t in sums]
        tw = None if self.tw is None else self.tw.to(xf[0].device, xf[0].dtype)
        rows = self._summed(sum(float(x.shape[0] * x.shape[1]) for x in xf))
        with torch.no_grad():   # what the steps do not change: the stream, its normalisation, the values
            fixed = []
            for x in xf:        # batch-first, as every stage here
                h = x if st.pre is None else st.pre.apply(getf, x)
                fixed.append((x, h, st.v.apply(getf, h)))

        def error(batches: Sequence[int]) -> Tensor:
            total = torch.zeros((), dtype=xf[0].dtype, device=xf[0].device)
            for i in batches:
                xb, h, v = fixed[int(i)]
                _, ctx = heads_attention(st.q.apply(getf, h), st.k.apply(getf, h), v, st.heads, st.causal)
                err = (xb + st.o.apply(getf, ctx) - targets[int(i)]) ** 2
                if tw is not None:
                    err = err * tw[None, :, None]
                total = total + err.sum() / rows
            return total

        best: List[Any] = [float("inf"), None]

        def batch_loss(batches: Tensor) -> Tensor:
            loss = error(batches.tolist())      # every batch of the fusion set: one step a pass
            value = self._summed(float(loss.detach()))
            if value < best[0]:                 # the parameters before this step, the closed form's first
                best[:] = [value, [t.detach().clone() for t in tensors]]
            return loss

        training = fl.training
        # only the queries and keys take gradients: the rest of the level (the output projection
        # the error runs through) is held fixed and is left without a .grad
        others = [p for p in fl.parameters() if p.requires_grad and all(p is not t for t in tensors)]
        last = float("inf")     # a divergence below leaves the best parameters seen
        try:
            for p in others:
                p.requires_grad_(False)
            for t in tensors:
                t.requires_grad_(True)
            run_epochs(fl, opt, n=len(fixed), batch_size=len(fixed), epochs=int(opts.attention_steps),
                       generator=torch.Generator().manual_seed(0), batch_loss=batch_loss,
                       diverged=lambda e, loss: (f"attention_steps: the queries and keys diverged at step {e} "
                                                 f"(error {loss}); use fewer steps or attention_steps=0"),
                       desc="attention steps")
            with torch.no_grad():               # the parameters after the last step
                last = self._summed(float(error(range(len(fixed)))))
        finally:
            fl.train(training)
            for p in others:
                p.requires_grad_(True)
            with torch.no_grad():
                keep = best[1] if best[1] is not None and best[0] < last else None
                for i, (t, w) in enumerate(zip(tensors, was)):
                    if keep is not None:
                        t.copy_(keep[i])
                    t.requires_grad_(w)
                    t.grad = None

    def _summed(self, value: float) -> float:
        """``value`` summed over the ranks when fusing distributed (else itself)."""
        if not self.method.distributed:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t)

    def _patterns(self, st: Attention, fl: nn.Module, h: Tensor, heads: int, dq_f: int) -> Tensor:
        """The fused attention pattern ``[B, H, T, T]`` on the normalised input ``h``."""
        get = _getter(fl)
        return attention_pattern(st.q.apply(get, h), st.k.apply(get, h), heads, st.causal)

    def _values_jointly(self, fl: nn.Module, st: Attention, bl: List[nn.Module], bst: List[Attention],
                        xf: List[Tensor], sums: List[Tensor], group: StreamGrouping,
                        sigma: np.ndarray, dq_f: int, dv_f: int) -> None:
        r"""Values from the residual target itself.  Given the fused patterns :math:`P_b`, the
        attention output :math:`\sum_b P_b h W_{v,b}^\top W_{o,b}^\top` is linear in the products
        :math:`M_b = W_{v,b}^\top W_{o,b}^\top`: least squares for every :math:`M_b` on the design
        :math:`[P_1 h, \dots, P_H h, 1]` to the residual target, then each :math:`M_b` cut to its
        rank-``dv`` part (SVD, :math:`U_b S_b^{1/2}` becomes head :math:`b`'s values); the output
        projection is refitted on the fused contexts afterwards.  (A value bias only adds a constant
        through the rows of :math:`P_b`, which sum to one: it is left to the output bias.)  The prior
        of :math:`M_b` is the weighted centre of the products of the base heads matched to fused
        head :math:`b`, in the fused stream's coordinates."""
        heads = st.heads
        k = int(xf[0].shape[-1])
        prior = torch.zeros(heads * k + 1, k, dtype=torch.float64, device=self.device)
        for i, (lv, s) in enumerate(zip(bl, bst)):
            v = _prior(lv, s.v, group.labels[i], k, s.pre, s.v.bias is not None)      # [k(+1), n_v]
            wo = s.o.matrix(tensor_of(lv, s.o.weight)).detach().double()                # [n_i, n_v]
            comb = group.combiners[i].to(wo.device)                                    # [n_i, k]
            dv = wo.shape[1] // heads
            for b in range(heads):
                cols = slice(int(sigma[i, b]) * dv, (int(sigma[i, b]) + 1) * dv)
                mb = v[:, cols] @ wo[:, cols].T @ comb                                   # [k(+1), k]
                prior[b * k:(b + 1) * k] += mb[:k]
                if s.v.bias is not None:
                    prior[-1] += mb[k]
            if s.o.bias is not None:
                prior[-1] += s.o.rows(tensor_of(lv, s.o.bias)).detach().double() @ comb
        stats = LinearStats()
        with torch.no_grad():
            for j, x in enumerate(xf):
                h = _normalised(st.pre, x)
                pattern = self._patterns(st, fl, h, heads, dq_f)
                z = torch.cat([pattern[:, b] @ h for b in range(heads)], -1)
                tgt = sums[j] - x.double()
                stats.update(_design(z, True), _flat(tgt), _scale(z, self.tw))
        m = self._solve(stats, prior).weights
        values = torch.zeros(heads * dv_f, k, dtype=torch.float64, device=m.device)
        for b in range(heads):
            u, sv, _ = torch.linalg.svd(m[b * k:(b + 1) * k])
            u = u[:, :dv_f]
            # a sign per singular vector (its largest entry positive), so that the same statistics
            # summed in another order give the same values
            u = u * torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True)))
            values[b * dv_f:(b + 1) * dv_f] = (u * sv[:dv_f].sqrt()).T
        _write_rows(fl, st.v, values, st.v.start, st.v.start + heads * dv_f)
        if st.v.bias:
            _write(fl, st.v.bias, torch.zeros(heads * dv_f), st.v.start, st.v.start + heads * dv_f)

    def _values_per_head(self, level: int, fl: nn.Module, st: Attention, xf: List[Tensor],
                         base_parts: List[List[Dict[str, Tensor]]], sigma: np.ndarray, priors: List[Tensor],
                         nq: List[int], dv: List[int], dq_f: int, dv_f: int) -> List[Tensor]:
        """Values head by head (models too wide for :meth:`_values_jointly`): given fused head
        ``b``'s pattern, least squares on ``[P_b h, 1]`` to the grouped contexts of the base heads
        matched to it (their value neurons grouped).  Returns every model's value neurons' fused
        labels (the output projection's prior)."""
        heads = len(sigma[0])
        bias_v = st.v.bias is not None
        vstats = [LinearStats() for _ in range(heads)]
        with torch.no_grad():
            for j, x in enumerate(xf):
                h = _normalised(st.pre, x)
                pattern = self._patterns(st, fl, h, heads, dq_f)
                for b in range(heads):
                    ctx = [p["ctx"][..., sigma[i, b] * dv[i]:(sigma[i, b] + 1) * dv[i]]
                           for i, p in enumerate(base_parts[j])]
                    vstats[b].update(_design(pattern[:, b] @ h, bias_v), [_flat(c) for c in ctx],
                                     _scale(h, self.tw))
        labels = [torch.zeros(d * heads, dtype=torch.long) for d in dv]
        for b in range(heads):
            pv = torch.cat([priors[i][:, 2 * nq[i] + sigma[i, b] * dv[i]:2 * nq[i] + (sigma[i, b] + 1) * dv[i]]
                            for i in range(len(dv))], 1)
            sol = self._solve(vstats[b], pv)
            g = self._group_inner(sol.features, dv, dv_f, level)
            w = torch.from_numpy(np.asarray(g.weights, dtype=np.float64))
            _write_proj(fl, st.v, sol.combine(w, torch.from_numpy(g.labels).long(), dv_f), bias_v, b * dv_f)
            pos = 0
            for i in range(len(dv)):
                a = int(sigma[i, b])
                labels[i][a * dv[i]:(a + 1) * dv[i]] = b * dv_f + torch.from_numpy(g.labels[pos:pos + dv[i]]).long()
                pos += dv[i]
        return labels

    def _mlp(self, level: int, fl: nn.Module, st: MLP, bl: List[nn.Module], bst: List[MLP], xf: List[Tensor],
             xb: List[List[Tensor]], group: Optional[StreamGrouping]) -> None:
        assert group is not None
        getf = _getter(fl)
        gets = [_getter(lv) for lv in bl]
        widths = [_rows_of(lv, s.fc1) for lv, s in zip(bl, bst)]
        k_h = _rows_of(fl, st.fc1)
        bias1 = st.fc1.bias is not None
        stats = LinearStats()
        base_parts: List[List[Dict[str, Tensor]]] = []
        with torch.no_grad():
            for j, x in enumerate(xf):
                parts = [mlp_parts(s, lv, g, xb[i][j]) for i, (s, lv, g) in enumerate(zip(bst, bl, gets))]
                base_parts.append(parts)
                stats.update(_design(_normalised(st.pre, x), bias1), [_flat(p["z"]) for p in parts],
                             _scale(x, self.tw))
        k_in = int(xf[0].shape[-1])
        prior = torch.cat([_prior(lv, s.fc1, group.labels[i], k_in, s.pre, bias1) for i, (lv, s) in enumerate(zip(bl, bst))], 1)
        sol = self._solve(stats, prior)
        g = self._group_inner(sol.features, widths, k_h, level)
        w = torch.from_numpy(np.asarray(g.weights, dtype=np.float64))
        _write_proj(fl, st.fc1, sol.combine(w, torch.from_numpy(g.labels).long(), k_h), bias1)
        hidden = list(torch.split(torch.from_numpy(g.labels).long(), widths))
        _identity_norm(fl, st.pre)
        act = activation(fl, st.act)
        inputs, targets = [], []
        with torch.no_grad():
            sums = [group.target([bp["sum"] for bp in parts]) for parts in base_parts]
            for j, x in enumerate(xf):
                z = st.fc1.apply(getf, _normalised(st.pre, x))
                inputs.append(act(z))
                targets.append(sums[j] - x.double())
        self._fit_residual(fl, st.fc2, inputs, targets, self._residual_prior(
            bl, [s.fc2 for s in bst], hidden, k_h, st.fc2.bias is not None, group.combiners))
        outs = sums   # the grouped outputs of the stage (without a post-norm, its sums)
        if st.post is not None:
            with torch.no_grad():
                fused = [mlp_parts(st, fl, getf, x)["sum"] for x in xf]
                outs = [group.target([bp["out"] for bp in parts]) for parts in base_parts]
            self._fit_norm(fl, st.post, fused, outs)
        self._base_out, self._stage_targets = base_parts, outs

    def _stream_norm(self, fl: nn.Module, st: StreamNorm, bl: List[nn.Module], bst: List[StreamNorm],
                     xf: List[Tensor], xb: List[List[Tensor]], group: Optional[StreamGrouping]) -> None:
        assert group is not None
        gets = [_getter(lv) for lv in bl]
        with torch.no_grad():
            outs = [group.target([s.norm.apply(g, xb[i][j]) for i, (s, g) in enumerate(zip(bst, gets))])
                    for j in range(len(xf))]
        self._fit_norm(fl, st.norm, xf, outs)

    def _head(self, level: int, fl: nn.Module, st: Head, bl: List[nn.Module], bst: List[Head], xf: List[Tensor],
              xb: List[List[Tensor]]) -> None:
        getf = _getter(fl)
        gets = [_getter(lv) for lv in bl]
        w_out = torch.from_numpy(self.method.output_level_weights(self.run, self.models)).to(self.device)  # [N, C]
        pooled = [_pool(_normalised(st.norm, x), st.pool) for x in xf]
        stream = self.streams.get(self.heads[level - 1]) if level > 0 else None
        k_in = int(xf[0].shape[-1])
        in_labels: List[Optional[Tensor]] = list(stream.labels) if stream is not None else [None] * len(bl)
        norms = [s.norm for s in bst]
        _identity_norm(fl, st.norm)
        if st.dense is not None:
            widths = [_rows_of(lv, s.dense) for lv, s in zip(bl, bst)]  # type: ignore[arg-type]
            k_p = _rows_of(fl, st.dense)
            bias = st.dense.bias is not None
            stats = LinearStats()
            with torch.no_grad():
                for j, h in enumerate(pooled):
                    a = []
                    for i, (s, lv, g) in enumerate(zip(bst, bl, gets)):
                        hb = _pool(xb[i][j] if s.norm is None else s.norm.apply(g, xb[i][j]), s.pool)
                        a.append(s.dense.apply(g, hb))  # type: ignore[union-attr]
                    stats.update(_design(h, bias), a)
            prior = torch.cat([_prior(lv, s.dense, in_labels[i], k_in, s.norm, bias)  # type: ignore[arg-type]
                               for i, (lv, s) in enumerate(zip(bl, bst))], 1)
            sol = self._solve(stats, prior)
            g = self._group_inner(sol.features, widths, k_p, level)
            w = torch.from_numpy(np.asarray(g.weights, dtype=np.float64))
            _write_proj(fl, st.dense, sol.combine(w, torch.from_numpy(g.labels).long(), k_p), bias)
            in_labels = list(torch.split(torch.from_numpy(g.labels).long(), widths))
            k_in, norms = k_p, [None] * len(bl)
            act = activation(fl, st.act)
            with torch.no_grad():
                pooled = [act(st.dense.apply(getf, h)) for h in pooled]
        inputs, targets = [], []
        with torch.no_grad():
            for j, h in enumerate(pooled):
                logits = [m.levels[level](xb[i][j]).double() for i, m in enumerate(self.models)]
                inputs.append(h)
                targets.append(sum(w_out[i][None, :] * z for i, z in enumerate(logits)))
        fc_bias = st.fc.bias is not None
        prior = sum(_prior(lv, s.fc, in_labels[i], k_in, norms[i], fc_bias) * w_out[i][None, :].double().cpu()
                    for i, (lv, s) in enumerate(zip(bl, bst)))
        self._fit_residual(fl, st.fc, inputs, targets, prior)  # type: ignore[arg-type]


class _MaskedAdam(torch.optim.Adam):
    """Adam that keeps the gradient of the given entries only (the queries' and keys' rows of a
    packed tensor) and, distributed, sums the ranks' gradients first, so every rank steps alike."""

    def __init__(self, params: List[Tensor], masks: Dict[int, Tensor], lr: float, distributed: bool) -> None:
        super().__init__(params, lr=lr)
        self._masks, self._distributed = masks, distributed

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        with torch.no_grad():
            for group in self.param_groups:
                for t in group["params"]:
                    if t.grad is None:
                        t.grad = torch.zeros_like(t)
                    if self._distributed:
                        import torch.distributed as dist

                        dist.all_reduce(t.grad)
                    t.grad.mul_(self._masks[id(t)])
        return super().step(closure)


def _relative_error(values: Sequence[Tensor], targets: Sequence[Tensor]) -> float:
    r""":math:`\lVert v - t\rVert^2 / \lVert t - \bar t\rVert^2` over all rows (``\bar t``: the
    targets' mean per neuron): 0 is a perfect fit, 1 no better than the mean."""
    err = sum(float(((v.double() - t) ** 2).sum()) for v, t in zip(values, targets))
    flat = torch.cat([_flat(t) for t in targets], 0)
    spread = float(((flat - flat.mean(0)) ** 2).sum())
    return err / max(spread, 1e-300)


def _batch_first(spec: TransformerSpec) -> List[Any]:
    """The stages of ``spec`` computing on ``[B, T, C]`` tensors (the fit transposes a
    ``seq_first`` level's inputs and outputs)."""
    if not spec.seq_first:
        return list(spec.stages)
    return [dataclasses.replace(s, seq_first=False) if isinstance(s, Attention) else s for s in spec.stages]
