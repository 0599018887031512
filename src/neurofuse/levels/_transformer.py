r"""Transformer levels: what their tensors are, as one residual stream, attention heads and MLPs.

A transformer is one *residual stream* from the embeddings to the head: every block reads it and
adds to it, so the stream's neurons are one space through the whole network, and every tensor
that reads or writes the stream (the embeddings' projection, CLS token and position embedding,
every block's input projections' columns and output projections' rows, every LayerNorm's weight
and bias, the head's columns) follows one map.  Inside a block:

* **attention heads are units**: the heads of two models are matched as wholes (a head's
  queries, keys, values and its columns of the output projection move together); inside a head
  one map is shared by the queries and the keys (space ``qk<i>``, the attention logits
  :math:`q^\top k` are unchanged by a permutation applied to both) and one by the values and the
  output projection's columns (space ``vo<i>``);
* **the MLP's hidden neurons** (space ``h<i>``) are matched on their own.

A level's transformer structure is a :class:`TransformerSpec`: a sequence of *stages*
(:class:`Embed`, :class:`Affix`, :class:`Attention`, :class:`MLP`, :class:`StreamNorm`,
:class:`Head`) whose tensors are named by their state-dict keys relative to the level.  The spec
gives the level's :class:`~neurofuse.levels._spaces.LevelLayout` (:meth:`TransformerSpec.layout`:
which tensor follows which space, along which axis) and recomputes the level from its parts
(:meth:`TransformerSpec.forward`, :func:`attention_parts`, :func:`mlp_parts`), which the
closed-form block fit reads sub-level by sub-level.

Where a spec comes from (:func:`describe`), first match wins:

1. the level's ``transformer_spec`` attribute (set by the Hugging Face adapters and the automatic
   levels);
2. a module that describes itself: a ``transformer_stages(prefix)`` method (the zoo's ViT parts);
3. the conventions of the usual code, checked by running them: ``nn.TransformerEncoderLayer``
   (packed ``in_proj``, pre- or post-norm), timm-style pre-norm blocks (``norm1``, ``attn`` with a
   packed ``qkv`` or ``q``/``k``/``v`` layers and ``proj``, ``norm2``, ``mlp`` with ``fc1``,
   ``act``, ``fc2``), an ``nn.Sequential`` of such parts, and a head chain
   ``[LayerNorm?, token pooling, LayerNorm?, Linear]``.  A module recognised by convention is
   accepted only if the stages recompute its output on a random input (to ``1e-4``).

References
----------
Imfeld, M., Graldi, J., Giordano, M., Hofmann, T., Anagnostidis, S., & Singh, S. P. (2024).
Transformer Fusion with Optimal Transport. ICLR 2024.  Verma, N., & Elbayad, M. (2024). Merging
Text Transformer Models from Different Initializations. TMLR 2024.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import IncompatibleModelsError
from ._spaces import LevelLayout, Space

__all__ = [
    "MLP",
    "Affix",
    "Attention",
    "Embed",
    "Head",
    "Norm",
    "Proj",
    "StreamNorm",
    "TransformerSpec",
    "attention_parts",
    "attention_pattern",
    "describe",
    "heads_attention",
    "mlp_parts",
]

Getter = Callable[[str], Tensor]


# ---------------------------------------------------------------------------------------------
# the stages
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Proj:
    """An affine map of the level: rows ``[start, stop)`` of ``weight`` (and ``bias``).

    ``module`` is the module whose *input* the map reads (for probes: a packed ``qkv`` Linear,
    or an ``nn.MultiheadAttention`` whose ``in_proj_weight`` is not a module of its own).
    ``transposed``: the weight is stored ``[in, out]`` (GPT-2's ``Conv1D``, :math:`y = xW + b`);
    its rows ``[start, stop)`` are then columns of the stored tensor.
    """

    weight: str
    bias: Optional[str]
    module: str
    start: int = 0
    stop: Optional[int] = None
    transposed: bool = False

    def rows(self, t: Tensor) -> Tensor:
        """Rows ``[start, stop)`` of a vector (the bias)."""
        return t[self.start:self.stop]

    def oriented(self, w: Tensor) -> Tensor:
        """The whole stored weight ``w`` as ``[out, in]`` (a view; every row, a packed tensor's too)."""
        return w.T if self.transposed else w

    def matrix(self, w: Tensor) -> Tensor:
        """The map's ``[out, in]`` weight rows from the stored tensor ``w`` (a view)."""
        return self.oriented(w)[self.start:self.stop]

    def apply(self, get: Getter, x: Tensor) -> Tensor:
        w = self.matrix(get(self.weight))
        b = None if self.bias is None else self.rows(get(self.bias))
        return F.linear(x, w, b)

    @property
    def probe(self) -> Tuple[str, str, Optional[str], int, Optional[int], bool]:
        """The map as a probe of an internal space (:class:`~neurofuse.levels._spaces.Space`)."""
        return (self.module, self.weight, self.bias, self.start, self.stop, self.transposed)

    @property
    def kind(self) -> str:
        """Its weight's kind in a level layout: ``"linear"``, or ``"linear_t"`` stored transposed."""
        return "linear_t" if self.transposed else "linear"


@dataclasses.dataclass(frozen=True)
class Norm:
    """A LayerNorm over the stream's neurons (``weight``/``bias`` may be absent)."""

    weight: Optional[str]
    bias: Optional[str]
    eps: float

    def apply(self, get: Getter, x: Tensor, affine: bool = True) -> Tensor:
        w = get(self.weight) if (affine and self.weight) else None
        b = get(self.bias) if (affine and self.bias) else None
        return F.layer_norm(x, (x.shape[-1],), w, b, self.eps)

    def keys(self) -> List[str]:
        return [k for k in (self.weight, self.bias) if k]


@dataclasses.dataclass(frozen=True)
class Embed:
    """The embeddings: ``[cls;] tokens + pos + rows``, then an optional LayerNorm.

    ``kind`` is ``"unfold"`` (non-overlapping ``patch`` x ``patch`` patches and a Linear, the
    zoo's ViT), ``"conv"`` (a patch convolution: Hugging Face ViT, timm) or ``"lookup"`` (token
    ids and an embedding table: BERT).  ``pos`` is a ``[1, T, C]`` parameter or, with
    ``pos_table``, the rows ``pos_offset ... pos_offset + T - 1`` of a ``[max_T, C]`` table
    (RoBERTa's positions start after its padding id); ``rows`` are single table rows added to
    every token (BERT's token type 0).
    """

    kind: str
    proj: Proj
    cls: Optional[str] = None
    pos: Optional[str] = None
    pos_table: bool = False
    rows: Tuple[str, ...] = ()
    patch: int = 0
    stride: Tuple[int, int] = (1, 1)
    norm: Optional[Norm] = None
    pos_offset: int = 0


@dataclasses.dataclass(frozen=True)
class Affix:
    """Tokens of the stream made ready for the blocks: a ``[B, C, H, W]`` feature map flattened
    to ``[B, H*W, C]`` (``flatten``), a CLS token put in front and a position embedding added
    (the part of a timm ``VisionTransformer``'s forward between its patch convolution and its
    first block)."""

    flatten: bool
    cls: Optional[str] = None
    pos: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Attention:
    """``x + o(attention(q(h), k(h), v(h)))`` with ``h = pre(x)`` (pre-norm) or ``x``; with
    ``post``, a LayerNorm of the sum (post-norm, BERT).  ``heads`` heads of equal width,
    scaled dot products (scale ``1/sqrt(head width)``), no mask, or with ``causal`` token ``t``
    attending to tokens ``<= t`` only (a decoder, GPT-2); ``seq_first`` for ``[T, B, C]``
    inputs."""

    q: Proj
    k: Proj
    v: Proj
    o: Proj
    heads: int
    pre: Optional[Norm] = None
    post: Optional[Norm] = None
    seq_first: bool = False
    index: int = 0
    causal: bool = False


@dataclasses.dataclass(frozen=True)
class MLP:
    """``x + fc2(act(fc1(h)))`` with ``h = pre(x)`` or ``x``; with ``post`` a LayerNorm of the sum.

    ``act`` is a module path relative to the level, or ``"relu"``, ``"gelu"``,
    ``"gelu_tanh"`` for the functional forms."""

    fc1: Proj
    fc2: Proj
    act: str
    pre: Optional[Norm] = None
    post: Optional[Norm] = None
    index: int = 0


@dataclasses.dataclass(frozen=True)
class StreamNorm:
    """A LayerNorm of the stream on its own (a final encoder norm)."""

    norm: Norm


@dataclasses.dataclass(frozen=True)
class Head:
    """``fc(act(dense(pool(norm(x)))))``: ``pool`` is ``"cls"`` (token 0), ``"last"`` (the last
    token: a causal decoder's summary, GPT-2's sequence classification on unpadded inputs) or
    ``"mean"`` (over the tokens); ``dense``/``act`` an optional inner layer (BERT's pooler, space
    ``p``)."""

    fc: Proj
    norm: Optional[Norm] = None
    pool: str = "cls"
    dense: Optional[Proj] = None
    act: Optional[str] = None


Stage = Union[Embed, Affix, Attention, MLP, StreamNorm, Head]

_ACT_FUNCS: Dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "tanh": torch.tanh,
}


def _module(root: nn.Module, path: str) -> nn.Module:
    m = root
    for part in path.split("."):
        m = getattr(m, part)
    return m


def tensor_of(root: nn.Module, key: str) -> Tensor:
    """The tensor ``key`` (a state-dict key relative to ``root``), read through attributes so that
    parameters swapped in by ``torch.func.functional_call`` are seen."""
    obj = root
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[return-value]


def activation(root: nn.Module, act: Optional[str]) -> Callable[[Tensor], Tensor]:
    """The non-linearity ``act`` of a stage (identity for ``None``)."""
    if act is None:
        return lambda t: t
    if act in _ACT_FUNCS:
        return _ACT_FUNCS[act]
    return _module(root, act)


#: the token a pooling reads alone (``None``: all of them)
POOL_TOKEN = {"cls": 0, "last": -1, "mean": None}


def _pool(h: Tensor, pool: str) -> Tensor:
    token = POOL_TOKEN[pool]
    return h.mean(1) if token is None else h[:, token]


# ---------------------------------------------------------------------------------------------
# computing the stages (the closed-form fit reads the parts)
# ---------------------------------------------------------------------------------------------
def embed_forward(stage: Embed, root: nn.Module, get: Getter, x: Tensor, pre_norm: bool = False) -> Tensor:
    """The embeddings; ``pre_norm`` stops before the LayerNorm."""
    p = stage.proj
    if stage.kind == "lookup":
        tok = F.embedding(x.long(), get(p.weight))
    elif stage.kind == "unfold":
        patches = F.unfold(x, kernel_size=stage.patch, stride=stage.patch).transpose(1, 2)
        tok = p.apply(get, patches)
    else:
        conv = _module(root, p.module)
        w = get(p.weight)
        tok = F.conv2d(x.to(w.dtype), w, None if p.bias is None else get(p.bias), stride=conv.stride,
                       padding=conv.padding, dilation=conv.dilation).flatten(2).transpose(1, 2)
    return _finish_tokens(tok, stage.cls, stage.pos, stage.pos_table, stage.rows, get,
                          None if pre_norm else stage.norm, stage.pos_offset)


def _finish_tokens(tok: Tensor, cls: Optional[str], pos: Optional[str], table: bool, rows: Sequence[str],
                   get: Getter, norm: Optional[Norm], offset: int = 0) -> Tensor:
    if cls is not None:
        c = get(cls).reshape(1, 1, -1)
        tok = torch.cat([c.expand(tok.shape[0], 1, -1), tok], dim=1)
    if pos is not None:
        pe = get(pos)
        tok = tok + (pe[offset:offset + tok.shape[1]].unsqueeze(0) if table else pe)
    for r in rows:
        tok = tok + get(r)[0]
    return tok if norm is None else norm.apply(get, tok)


def affix_forward(stage: Affix, get: Getter, x: Tensor) -> Tensor:
    tok = x.flatten(2).transpose(1, 2) if stage.flatten else x
    return _finish_tokens(tok, stage.cls, stage.pos, False, (), get, None)


def attention_pattern(q: Tensor, k: Tensor, heads: int, causal: bool = False) -> Tensor:
    """``[B, H, T, T]`` softmax of the scaled dot products of queries and keys ``[B, T, H*d]``;
    with ``causal``, token ``t`` attends to tokens ``<= t`` only."""
    b, t, _ = q.shape
    dq = q.shape[-1] // heads
    qh = q.reshape(b, t, heads, dq).transpose(1, 2)
    kh = k.reshape(b, t, heads, dq).transpose(1, 2)
    logits = (qh @ kh.transpose(-2, -1)) / math.sqrt(dq)
    if causal:
        future = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
        logits = logits.masked_fill(future, float("-inf"))
    return torch.softmax(logits, dim=-1)


def heads_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, causal: bool = False) -> Tuple[Tensor, Tensor]:
    """``(pattern [B, H, T, T], context [B, T, H*dv])`` of scaled dot-product attention."""
    b, t, _ = q.shape
    dv = v.shape[-1] // heads
    vh = v.reshape(b, t, heads, dv).transpose(1, 2)
    pattern = attention_pattern(q, k, heads, causal)
    ctx = (pattern @ vh).transpose(1, 2).reshape(b, t, heads * dv)
    return pattern, ctx


def attention_parts(stage: Attention, get: Getter, x: Tensor, affine_pre: bool = True) -> Dict[str, Tensor]:
    """Every intermediate value of an attention stage on ``x`` (``[B, T, C]``; ``[T, B, C]`` with
    ``seq_first``): ``u`` (the normalised input, without the pre-norm's affine when
    ``affine_pre`` is false), ``h`` (what q, k, v read), ``q``, ``k``, ``v``, ``pattern``,
    ``ctx`` (heads concatenated), ``sum`` (``x + o(ctx)``, before a post-norm) and ``out``; all
    token tensors ``[B, T, .]``."""
    if stage.seq_first:
        x = x.transpose(0, 1)
    h = x if stage.pre is None else stage.pre.apply(get, x, affine_pre)
    q, k, v = stage.q.apply(get, h), stage.k.apply(get, h), stage.v.apply(get, h)
    pattern, ctx = heads_attention(q, k, v, stage.heads, stage.causal)
    s = x + stage.o.apply(get, ctx)
    out = s if stage.post is None else stage.post.apply(get, s)
    return {"h": h, "q": q, "k": k, "v": v, "pattern": pattern, "ctx": ctx, "sum": s, "out": out}


def mlp_parts(stage: MLP, root: nn.Module, get: Getter, x: Tensor, affine_pre: bool = True,
              seq_first: bool = False) -> Dict[str, Tensor]:
    """Intermediate values of an MLP stage: ``h`` (what fc1 reads), ``z`` (fc1's output, the
    hidden pre-activations), ``sum`` (``x + fc2(act(z))``) and ``out``."""
    if seq_first:
        x = x.transpose(0, 1)
    h = x if stage.pre is None else stage.pre.apply(get, x, affine_pre)
    z = stage.fc1.apply(get, h)
    s = x + stage.fc2.apply(get, activation(root, stage.act)(z))
    out = s if stage.post is None else stage.post.apply(get, s)
    return {"h": h, "z": z, "sum": s, "out": out}


def head_forward(stage: Head, root: nn.Module, get: Getter, x: Tensor) -> Tensor:
    h = x if stage.norm is None else stage.norm.apply(get, x)
    h = _pool(h, stage.pool)
    if stage.dense is not None:
        h = activation(root, stage.act)(stage.dense.apply(get, h))
    return stage.fc.apply(get, h)


def stage_forward(stage: Stage, root: nn.Module, get: Getter, x: Tensor, seq_first: bool = False) -> Tensor:
    """One stage on ``x``; token tensors are ``[B, T, C]`` between stages."""
    if isinstance(stage, Embed):
        return embed_forward(stage, root, get, x)
    if isinstance(stage, Affix):
        return affix_forward(stage, get, x)
    if isinstance(stage, Attention):
        return attention_parts(stage, get, x)["out"]
    if isinstance(stage, MLP):
        return mlp_parts(stage, root, get, x)["out"]
    if isinstance(stage, StreamNorm):
        return stage.norm.apply(get, x)
    return head_forward(stage, root, get, x)


# ---------------------------------------------------------------------------------------------
# the spec of a level
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TransformerSpec:
    """The stages of one level, in order; keys are relative to the level.

    ``seq_first``: the level's token tensors are ``[T, B, C]`` (``nn.TransformerEncoderLayer``
    with ``batch_first=False``).
    """

    stages: Tuple[Stage, ...]
    seq_first: bool = False

    @property
    def reads_stream(self) -> bool:
        """Whether the level's input is the residual stream (else: the network input)."""
        return not isinstance(self.stages[0], Embed)

    @property
    def writes_stream(self) -> bool:
        """Whether the level's output is the residual stream (else: the head's output)."""
        return not isinstance(self.stages[-1], Head)

    @property
    def stream_space(self) -> str:
        """The name of the stream's space in the level's layout: ``"out"`` when the level writes
        the stream (``"in"`` is then the same space for a level that also reads it), ``"in"``
        for the head level."""
        return "out" if self.writes_stream else "in"

    def getter(self, level: nn.Module, params: Optional[Dict[str, Tensor]] = None) -> Getter:
        if params:
            return lambda key: params[key] if key in params else tensor_of(level, key)
        return lambda key: tensor_of(level, key)

    def resized(self, level: nn.Module, params: Optional[Dict[str, Tensor]]) -> "TransformerSpec":
        """The spec for ``params`` whose widths may differ from the level's own tensors (a model
        aligned, in whole or in part, to an anchor of other widths): the rows of a packed
        projection (``qkv``) are rescaled to the tensor in ``params``, whose parts (queries, keys,
        values: one attention's spaces, aligned together) keep their proportions."""
        if not params:
            return self

        def fit(p: Proj) -> Proj:
            if p.stop is None or p.weight not in params:
                return p
            own, new = (int(p.oriented(t).shape[0]) for t in (tensor_of(level, p.weight), params[p.weight]))
            if new == own:
                return p
            if (p.start * new) % own or (p.stop * new) % own:
                raise IncompatibleModelsError(
                    f"{p.weight}: rows [{p.start}, {p.stop}) of a packed projection of {own} rows have no "
                    f"place in its aligned tensor of {new} rows (its parts would change proportions); "
                    "fuse models whose packed parts are of equal widths")
            return dataclasses.replace(p, start=p.start * new // own, stop=p.stop * new // own)

        def stage(st: Stage) -> Stage:
            changes = {f.name: fit(getattr(st, f.name)) for f in dataclasses.fields(st)
                       if isinstance(getattr(st, f.name), Proj)}
            return dataclasses.replace(st, **changes) if changes else st

        return dataclasses.replace(self, stages=tuple(stage(st) for st in self.stages))

    def forward(self, level: nn.Module, x: Tensor, params: Optional[Dict[str, Tensor]] = None) -> Tensor:
        """The level's output recomputed from the stages (``params`` override tensors, of any
        widths: :meth:`resized`)."""
        spec = self.resized(level, params)
        get = spec.getter(level, params)
        h = x
        for st in spec.stages:
            if spec.seq_first and isinstance(st, (Attention, MLP)):
                h = stage_forward(st, level, get, h).transpose(0, 1)
            else:
                h = stage_forward(st, level, get, h)
        return h

    def space_values(self, level: nn.Module, x: Tensor, params: Optional[Dict[str, Tensor]] = None
                     ) -> Dict[str, Tensor]:
        """The values ``[rows, neurons]`` of the level's internal spaces on ``x``, as
        :func:`~neurofuse.levels._layout.capture_spaces` reads them through their probes (a
        head's queries and keys stacked along the rows), computed from the stages with
        ``params`` overriding tensors: the level may run with tensors of other widths than its
        modules were built with (a model aligned to an anchor of another width: :meth:`resized`)."""
        spec = self.resized(level, params)
        get = spec.getter(level, params)
        out: Dict[str, Tensor] = {}
        h = x

        def rows(t: Tensor) -> Tensor:
            return t.reshape(-1, t.shape[-1])

        for st in spec.stages:
            if isinstance(st, Attention):
                parts = attention_parts(st, get, h)
                out[f"qk{st.index}"] = torch.cat([rows(parts["q"]), rows(parts["k"])], 0)
                out[f"vo{st.index}"] = rows(parts["v"])
                nxt = parts["out"]
            elif isinstance(st, MLP):
                parts = mlp_parts(st, level, get, h)
                out[f"h{st.index}"] = rows(parts["z"])
                nxt = parts["out"]
            elif isinstance(st, Head) and st.dense is not None:
                pooled = _pool(h if st.norm is None else st.norm.apply(get, h), st.pool)
                out["p"] = st.dense.apply(get, pooled)
                nxt = head_forward(st, level, get, h)
            else:
                nxt = stage_forward(st, level, get, h)
            h = nxt.transpose(0, 1) if spec.seq_first and isinstance(st, (Attention, MLP)) else nxt
        return out

    # -- layout -------------------------------------------------------------------------------
    def layout(self):  # type: ignore[no-untyped-def]
        """The :class:`~neurofuse.levels._spaces.LevelLayout`: every tensor with the space of
        its rows (axis 0; the last axis for ``"last"`` tensors) and of its columns."""

        s = self.stream_space
        tensors: List[Tuple[str, str, Optional[str], str]] = []
        internal: List[Space] = []

        def vec(key: Optional[str], space: str = s) -> None:
            if key:
                tensors.append((key, space, None, "vector"))

        def norm(n: Optional[Norm]) -> None:
            if n is not None:
                vec(n.weight)
                vec(n.bias)

        def proj(p: Proj, rows: str, cols: Optional[str], kind: Optional[str] = None) -> None:
            tensors.append((p.weight, rows, cols, kind or p.kind))
            vec(p.bias, rows)

        def packed(projs: Sequence[Tuple[Proj, str]], cols: str) -> None:
            """Projections sharing one tensor (a packed qkv): one entry, rows a concatenation."""
            groups: Dict[str, List[Tuple[Proj, str]]] = {}
            for p, sp in projs:
                groups.setdefault(p.weight, []).append((p, sp))
            for key, members in groups.items():
                members.sort(key=lambda m: m[0].start)
                rows = "+".join(sp for _, sp in members)
                tensors.append((key, rows, cols, members[0][0].kind))
                vec(members[0][0].bias, rows)

        for st in self.stages:
            if isinstance(st, Embed):
                if st.kind == "lookup":
                    tensors.append((st.proj.weight, s, None, "last"))
                else:
                    proj(st.proj, s, "in", "conv" if st.kind == "conv" else "linear")
                for key in (st.cls, st.pos, *st.rows):
                    if key:
                        tensors.append((key, s, None, "last"))
                norm(st.norm)
            elif isinstance(st, Affix):
                for key in (st.cls, st.pos):
                    if key:
                        tensors.append((key, s, None, "last"))
            elif isinstance(st, Attention):
                qk, vo = f"qk{st.index}", f"vo{st.index}"
                norm(st.pre)
                internal.append(Space(qk, st.q.module, None, heads=st.heads, unit=f"attn{st.index}",
                                      probes=(st.q.probe, st.k.probe)))
                internal.append(Space(vo, st.v.module, None, heads=st.heads, unit=f"attn{st.index}",
                                      probes=(st.v.probe,)))
                packed([(st.q, qk), (st.k, qk), (st.v, vo)], s)
                proj(st.o, s, vo)
                norm(st.post)
            elif isinstance(st, MLP):
                h = f"h{st.index}"
                norm(st.pre)
                act = st.act if st.act not in _ACT_FUNCS else None
                internal.append(Space(h, st.fc1.module, act, probes=(st.fc1.probe,)))
                proj(st.fc1, h, s)
                proj(st.fc2, s, h)
                norm(st.post)
            elif isinstance(st, StreamNorm):
                norm(st.norm)
            else:
                norm(st.norm)
                if st.dense is not None:
                    act = st.act if st.act not in _ACT_FUNCS else None
                    internal.append(Space("p", st.dense.module, act, probes=(st.dense.probe,)))
                    proj(st.dense, "p", s)
                    proj(st.fc, "out", "p")
                else:
                    proj(st.fc, "out", s)
        return LevelLayout(tuple(tensors), tuple(internal), self.reads_stream and self.writes_stream)

    def keys(self) -> List[str]:
        """Every tensor key the stages read."""
        return [t[0] for t in self.layout().tensors]


def numbered(stages: Sequence[Stage], seq_first: bool = False) -> TransformerSpec:
    """A spec of ``stages`` with attention and MLP stages numbered in order (space names)."""
    out: List[Stage] = []
    na = nm = 0
    for st in stages:
        if isinstance(st, Attention):
            st = dataclasses.replace(st, index=na)
            na += 1
        elif isinstance(st, MLP):
            st = dataclasses.replace(st, index=nm)
            nm += 1
        out.append(st)
    return TransformerSpec(tuple(out), seq_first)


def prefixed(stages: Sequence[Stage], prefix: str) -> List[Stage]:
    """``stages`` with every key and module path under ``prefix`` (``"parts.layer."``)."""

    def path(v):  # type: ignore[no-untyped-def]
        if isinstance(v, str):
            return v if v in _ACT_FUNCS else prefix + v
        if isinstance(v, tuple):
            return tuple(path(x) for x in v)
        return v

    def fix(st):  # type: ignore[no-untyped-def]
        changes = {}
        for f in dataclasses.fields(st):
            val = getattr(st, f.name)
            if f.name in _PATH_FIELDS:
                changes[f.name] = path(val)
            elif dataclasses.is_dataclass(val):
                changes[f.name] = fix(val)
        return dataclasses.replace(st, **changes)

    return [fix(st) for st in stages] if prefix else list(stages)


#: dataclass fields holding a key or a module path
_PATH_FIELDS = {"weight", "bias", "module", "cls", "pos", "rows", "act"}


# ---------------------------------------------------------------------------------------------
# recognising a level
# ---------------------------------------------------------------------------------------------
def _norm_of(m: nn.Module, path: str) -> Optional[Norm]:
    if not isinstance(m, nn.LayerNorm) or len(m.normalized_shape) != 1:
        return None
    return Norm(f"{path}.weight" if m.weight is not None else None,
                f"{path}.bias" if m.bias is not None else None, float(m.eps))


def _linear(m: nn.Module, path: str, start: int = 0, stop: Optional[int] = None) -> Optional[Proj]:
    if not isinstance(m, nn.Linear):
        return None
    return Proj(f"{path}.weight", f"{path}.bias" if m.bias is not None else None, path, start, stop)


def _act_name(fn: object, path: str) -> Optional[str]:
    if isinstance(fn, nn.Module):
        return path
    if fn is F.relu:
        return "relu"
    if fn is F.gelu:
        return "gelu"
    return None


def _encoder_layer(m: nn.Module) -> Optional[List[Stage]]:
    """``nn.TransformerEncoderLayer`` (packed ``in_proj``; pre- or post-norm)."""
    if not isinstance(m, nn.TransformerEncoderLayer):
        return None
    att = m.self_attn
    if not att._qkv_same_embed_dim or att.bias_k is not None or att.add_zero_attn:
        return None
    e = att.embed_dim
    bias = "self_attn.in_proj_bias" if att.in_proj_bias is not None else None
    q, k, v = (Proj("self_attn.in_proj_weight", bias, "self_attn", i * e, (i + 1) * e) for i in range(3))
    o = _linear(att.out_proj, "self_attn.out_proj")
    act = _act_name(m.activation, "activation")
    n1, n2 = _norm_of(m.norm1, "norm1"), _norm_of(m.norm2, "norm2")
    f1, f2 = _linear(m.linear1, "linear1"), _linear(m.linear2, "linear2")
    if None in (o, act, n1, n2, f1, f2):
        return None
    pre = bool(m.norm_first)
    return [Attention(q, k, v, o, att.num_heads, pre=n1 if pre else None, post=None if pre else n1,
                      seq_first=not att.batch_first),  # type: ignore[arg-type]
            MLP(f1, f2, act, pre=n2 if pre else None, post=None if pre else n2)]  # type: ignore[arg-type]


def _timm_block(m: nn.Module) -> Optional[List[Stage]]:
    """A timm-style pre-norm block: ``norm1``, ``attn`` (``qkv`` or ``q``/``k``/``v``, ``proj``,
    ``num_heads``), ``norm2``, ``mlp`` (``fc1``, ``act``, ``fc2``); layer scales and drop paths,
    if any, must be identities."""
    att, mlp = getattr(m, "attn", None), getattr(m, "mlp", None)
    if att is None or mlp is None:
        return None
    heads = getattr(att, "num_heads", None)
    n1, n2 = _norm_of(getattr(m, "norm1", None), "norm1"), _norm_of(getattr(m, "norm2", None), "norm2")
    o = _linear(getattr(att, "proj", None), "attn.proj")
    if not isinstance(heads, int) or n1 is None or n2 is None or o is None:
        return None
    for name in ("ls1", "ls2", "drop_path1", "drop_path2", "drop_path"):
        extra = getattr(m, name, None)
        if extra is not None and not (type(extra) is nn.Identity or isinstance(extra, nn.Dropout)):
            return None
    qkv = getattr(att, "qkv", None)
    if isinstance(qkv, nn.Linear) and qkv.out_features % 3 == 0:
        e = qkv.out_features // 3
        q, k, v = (_linear(qkv, "attn.qkv", i * e, (i + 1) * e) for i in range(3))
    else:
        q, k, v = (_linear(getattr(att, n, None), f"attn.{n}") for n in ("q", "k", "v"))
    for name in ("q_norm", "k_norm", "norm"):
        extra = getattr(att, name, None)
        if extra is not None and type(extra) is not nn.Identity:
            return None
    f1, f2 = _linear(getattr(mlp, "fc1", None), "mlp.fc1"), _linear(getattr(mlp, "fc2", None), "mlp.fc2")
    act_mod = getattr(mlp, "act", None)
    norm_mid = getattr(mlp, "norm", None)
    if None in (q, k, v, f1, f2) or not isinstance(act_mod, nn.Module) or (
            norm_mid is not None and type(norm_mid) is not nn.Identity):
        return None
    return [Attention(q, k, v, o, heads, pre=n1),  # type: ignore[arg-type]
            MLP(f1, f2, "mlp.act", pre=n2)]  # type: ignore[arg-type]


#: recognisers of transformer blocks by convention: ``fn(module) -> stages or None``
_BLOCK_RECOGNISERS: List[Callable[[nn.Module], Optional[List[Stage]]]] = [_encoder_layer, _timm_block]

#: modules recognised by convention and checked: module -> stages (or None: refused)
_CHECKED: "weakref.WeakKeyDictionary[nn.Module, Optional[List[Stage]]]" = weakref.WeakKeyDictionary()


def _stream_width(stages: Sequence[Stage], m: nn.Module) -> Optional[int]:
    for st in stages:
        if isinstance(st, Attention):
            return int(tensor_of(m, st.o.weight).shape[0])
    return None


def block_stages(m: nn.Module) -> Optional[List[Stage]]:
    """The stages of a transformer block recognised by convention, checked by recomputing its
    output on a random ``[2, 5, C]`` input; ``None`` if it is not one."""
    if m in _CHECKED:
        return _CHECKED[m]
    found: Optional[List[Stage]] = None
    for rec in _BLOCK_RECOGNISERS:
        stages = rec(m)
        if stages is not None:
            found = stages if _reproduces(m, stages) else None
            break
    _CHECKED[m] = found
    return found


def _reproduces(m: nn.Module, stages: List[Stage]) -> bool:
    width = _stream_width(stages, m)
    if width is None:
        return False
    spec = numbered(stages, seq_first=any(getattr(s, "seq_first", False) for s in stages))
    p = next(iter(m.parameters()))
    gen = torch.Generator().manual_seed(0)
    shape = (5, 2, width) if spec.seq_first else (2, 5, width)
    x = torch.randn(shape, generator=gen).to(p.device, p.dtype)
    was = m.training
    m.eval()
    try:
        with torch.no_grad():
            ref = m(x)
            ref = ref[0] if isinstance(ref, (tuple, list)) else ref
            got = spec.forward(m, x)
    except Exception:  # noqa: BLE001 - a module the convention misread
        return False
    finally:
        m.train(was)
    return isinstance(ref, Tensor) and ref.shape == got.shape and bool(
        torch.allclose(ref, got, atol=1e-4, rtol=1e-4))


def _head_chain(children: Sequence[Tuple[str, nn.Module]]) -> Optional[List[Stage]]:
    """``[LayerNorm, pooling glue..., Linear]`` or ``[pooling glue..., LayerNorm, Linear]`` whose
    glue selects token 0 or averages the tokens (checked on a random input)."""
    if not children or not isinstance(children[-1][1], nn.Linear):
        return None
    fc = _linear(children[-1][1], children[-1][0])
    norm: Optional[Norm] = None
    glue: List[nn.Module] = []
    for name, c in children[:-1]:
        if isinstance(c, nn.LayerNorm):
            if norm is not None:
                return None
            norm = _norm_of(c, name)
            if norm is None:
                return None
        elif any(True for _ in c.parameters()):
            return None
        else:
            glue.append(c)
    if not glue or norm is None:   # without a LayerNorm it is an affine level like any other
        return None
    width = children[-1][1].in_features
    x = torch.randn(2, 5, width, generator=torch.Generator().manual_seed(1))
    p = next(iter(children[-1][1].parameters()))
    x = x.to(p.device, p.dtype)
    modes = [g.training for g in glue]
    with torch.no_grad():
        h = x
        try:
            for g in glue:          # as fused: in eval mode (a dropout in the glue is the identity)
                h = g.eval()(h)
        except Exception:  # noqa: BLE001
            return None
        finally:
            for g, mode in zip(glue, modes):
                g.train(mode)
    norm_after = norm is not None and not isinstance(children[0][1], nn.LayerNorm)
    for pool in ("cls", "mean"):
        if h.shape == (2, width) and torch.allclose(h, _pool(x, pool), atol=1e-6):
            if pool == "mean" and norm_after:
                return None   # a LayerNorm of the mean is not the mean of the LayerNorms
            return [Head(fc, norm=norm, pool=pool)]  # type: ignore[arg-type]
    return None


def affixed_block(g, gm: nn.Module, nodes: Sequence, start) -> Optional[TransformerSpec]:  # type: ignore[no-untyped-def]
    """The spec of an automatic level that makes tokens ready and runs one transformer block
    (a timm ``VisionTransformer`` between its patch convolution and its first block: flatten the
    feature map, put a CLS token in front, add a position embedding), checked on the level's
    recorded input; ``None`` if the sub-graph is anything else.

    ``g`` is the traced model (:class:`neurofuse.levels._auto._Graph`), ``gm`` the level's
    sub-graph module, ``nodes`` its nodes (the last one calls the block) and ``start`` the node
    whose value is the level's input.
    """
    last = nodes[-1]
    block = g.module(last)
    stages = block_stages(block) if block is not None else None
    if stages is None:
        return None
    width = _stream_width(stages, block)
    cls = pos = None
    for n in nodes[:-1]:
        m = g.module(n)
        if m is not None and any(True for _ in m.parameters()):
            return None
        for a in n.all_input_nodes:
            if a.op != "get_attr":
                continue
            t = g.values.get(a)
            if not isinstance(t, Tensor) or t.dim() != 3 or t.shape[0] != 1 or t.shape[-1] != width:
                return None
            if t.shape[1] == 1 and cls in (None, str(a.target)):
                cls = str(a.target)
            elif pos in (None, str(a.target)):
                pos = str(a.target)
            else:
                return None
    x = g.values.get(start)
    if not isinstance(x, Tensor) or x.dim() not in (3, 4):
        return None
    spec = numbered([Affix(x.dim() == 4, None if cls is None else f"graph.{cls}",
                           None if pos is None else f"graph.{pos}")]
                    + prefixed(stages, f"graph.{last.target}."))
    holder = nn.Module()
    holder.graph = gm
    try:
        with torch.no_grad():
            ok = bool(torch.allclose(spec.forward(holder, x), gm(x), atol=1e-4, rtol=1e-4))
    except Exception:  # noqa: BLE001 - not what the guess says
        return None
    return spec if ok else None


def _stages(m: nn.Module, prefix: str) -> Optional[List[Stage]]:
    own = getattr(m, "transformer_stages", None)
    if callable(own):
        st = own()
        return None if st is None else prefixed(st, prefix)
    st = block_stages(m)
    if st is not None:
        return prefixed(st, prefix)
    if isinstance(m, nn.Sequential):
        kids = list(m.named_children())
        head = _head_chain(kids)
        if head is not None:
            return prefixed(head, prefix)
        out: List[Stage] = []
        for name, c in kids:
            if type(c) is nn.Identity or isinstance(c, nn.Dropout):
                continue
            sub = _stages(c, f"{prefix}{name}.")
            if sub is None:
                return None
            out.extend(sub)
        return out or None
    return None


def describe(level: nn.Module) -> Optional[TransformerSpec]:
    """The level's :class:`TransformerSpec`, or ``None`` if it is not a transformer level (see
    the module docstring for where specs come from).  A spec must cover every floating-point
    tensor of the level and hold at most one embedding or head, at the level's ends."""
    spec = getattr(level, "transformer_spec", None)
    if spec is None:
        stages = _stages(level, "")
        if not stages:
            return None
        spec = numbered(stages, seq_first=any(getattr(s, "seq_first", False) for s in stages))
    kinds = [type(s) for s in spec.stages]
    if Embed in kinds[1:] or Head in kinds[:-1] or (Embed in kinds and Head in kinds):
        return None
    if not set(kinds) & {Embed, Affix, Attention, MLP, Head}:   # a lone stream norm is no level
        return None
    covered = set(spec.keys())
    for key, t in level.state_dict().items():
        if t.is_floating_point() and key not in covered:
            return None
    return spec
