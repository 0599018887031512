"""Helpers for tests and self-checks (as ``captum.testing``): function-preserving permutations,
a log of the operations that copy tensors to the host."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .levels import LeveledNet

__all__ = ["CPU_LAPACK", "HostTransfers", "Transfer", "permute_hidden", "permute_spaces"]


def permute_hidden(model: LeveledNet, seed: int = 0,
                   generator: Optional[torch.Generator] = None) -> LeveledNet:
    """A copy of ``model`` whose hidden neurons are randomly permuted at every level.

    For models whose levels each end in one ``Linear``/``Conv2d`` (MLP, VGG) the copy computes the
    same function: the output neurons of level ``l`` and the matching inputs of level ``l + 1`` are
    permuted together (including conv-to-linear transitions through a flatten).  Fusing a model with
    such a copy must give back the model; that is the standard self-check of alignment methods.
    """
    gen = generator or torch.Generator().manual_seed(seed)
    out = model.clone()
    affines: List[nn.Module] = []
    for level in out.levels:
        found = [m for m in level.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        if not found:
            raise ValueError("permute_hidden needs a Linear or Conv2d layer in every level")
        affines.append(found[-1])
    with torch.no_grad():
        for a, nxt in zip(affines[:-1], affines[1:]):
            perm = torch.randperm(a.weight.shape[0], generator=gen)
            a.weight.copy_(a.weight[perm])
            if a.bias is not None:
                a.bias.copy_(a.bias[perm])
            w = nxt.weight
            if isinstance(nxt, nn.Linear) and isinstance(a, nn.Conv2d):
                c = a.weight.shape[0]
                nxt.weight.copy_(w.reshape(w.shape[0], c, -1)[:, perm].reshape(w.shape))
            else:
                nxt.weight.copy_(w[:, perm])
    return out


def _perm_map(perm: torch.Tensor):  # type: ignore[no-untyped-def]
    from .levels._layout import NeuronMap

    n = len(perm)
    plan = np.zeros((n, n))
    plan[perm.numpy(), np.arange(n)] = 1.0 / n
    return NeuronMap.from_plan(plan, np.full(n, 1.0 / n))


def _derangement(n: int, gen: torch.Generator) -> torch.Tensor:
    for _ in range(100):
        p = torch.randperm(n, generator=gen)
        if n < 2 or not torch.equal(p, torch.arange(n)):
            return p
    return p  # pragma: no cover


def _concat_perm(model: LeveledNet, lvl: int, lay: Any, in_map: Any, gen: torch.Generator,  # type: ignore[no-untyped-def]
                 like: Any = None):
    """The map of a concatenation level's output: a permutation inside every part (a part that is
    the level input keeps the input's map; a part a grouped convolution writes moves in its
    groups, in the order ``like(part, groups)`` gives), the block diagonal of them."""
    from .levels._layout import concat_maps, part_spans

    spans = part_spans(model, lvl, lay)
    parts = []
    for p, sp in zip(lay.parts, spans):
        n = sp.stop - sp.start
        if p == "in":
            parts.append(in_map if in_map is not None else _perm_map(torch.arange(n)))
            continue
        groups = lay.unit_groups(p)
        parts.append(_perm_map(_grouped_derangement(n, groups, gen, like(p, groups) if like and groups else None)))
    return concat_maps(parts)


def _grouped_derangement(n: int, groups: int, gen: torch.Generator,
                         like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A random permutation of ``n`` neurons in ``groups`` equal contiguous groups that keeps
    every group together (the groups reordered, each permuted inside); the groups in the order
    of the permutation ``like`` of another space in as many groups, if given (a grouped
    convolution's output keeps its input's order of groups)."""
    if groups < 2:
        return _derangement(n, gen)
    size = n // groups
    order = _derangement(groups, gen) if like is None else like[::len(like) // groups] // (len(like) // groups)
    return torch.cat([order[b] * size + _derangement(size, gen) for b in range(groups)])


def permute_spaces(model: LeveledNet, seed: int = 0) -> LeveledNet:
    """A copy of ``model`` with every neuron space of its alignment layout randomly permuted.

    Every residual stream (one permutation for all the levels it ties, with the embeddings, CLS
    token, position embedding and LayerNorms that follow it), every hidden level output and every
    internal space (an MLP's hidden neurons, a residual block's inner channels) gets its own
    permutation; attention spaces are permuted as heads (a random order of the heads, shared by a
    head's queries, keys, values and output columns) and inside every head (one permutation for
    the queries and keys, one for the values); a concatenation's output is permuted inside each of
    its parts (a part that is the level input follows the input's permutation); a space that a
    GroupNorm normalises in groups of several channels, or that a grouped convolution reads, is
    permuted as groups, and the space a grouped convolution writes keeps the order of groups of the
    space it reads.  The copy
    computes the same function (for every model :func:`neurofuse.levels.alignment_reason`
    accepts); fusing a model with it must give the model back.
    """
    from .levels._layout import align_level, check_alignable, output_unit_groups, space_sizes

    gen = torch.Generator().manual_seed(seed)
    layouts, heads = check_alignable([model], "permute_spaces", grouped=True)
    widths = model.level_widths()
    out = model.clone()
    stream: Dict[int, Tuple[object, Optional[torch.Tensor]]] = {}   # head -> (map, permutation)
    for lvl, lay in enumerate(layouts):
        maps: Dict[str, object] = {}
        perms: Dict[str, Optional[torch.Tensor]] = {}
        last = model.num_levels - 1
        if lvl > 0 and heads[lvl - 1] in stream:
            maps["in"], perms["in"] = stream[heads[lvl - 1]]
        sizes = space_sizes(model.levels[lvl], lay)
        order: Dict[str, torch.Tensor] = {}

        def like(space: str, groups: int) -> Optional[torch.Tensor]:
            """The permutation whose order of groups ``space`` keeps (the identity's where the
            space a grouped convolution reads is not permuted)."""
            source = lay.group_source(space)   # noqa: B023 - used within the iteration
            if source is None:
                return None
            found = perms.get(source)           # noqa: B023
            return torch.arange(groups) if found is None else found

        if lay.tied and heads[lvl] in stream:   # a stream's map is fixed before its tied levels
            maps["out"], perms["out"] = stream[heads[lvl]]
        for sp in lay.internal:
            n = sizes[sp.name]
            if sp.heads:
                hd = n // sp.heads
                hp = order.setdefault(sp.unit, _derangement(sp.heads, gen))
                perm = torch.cat([hp[b] * hd + _derangement(hd, gen) for b in range(sp.heads)])
            else:
                groups = lay.unit_groups(sp.name)
                perm = _grouped_derangement(n, groups, gen, like(sp.name, groups))
            maps[sp.name], perms[sp.name] = _perm_map(perm), perm
        if lvl < last and heads[lvl] >= 0 and heads[last] != heads[lvl]:   # a stream tied to the input or output keeps its order
            if heads[lvl] not in stream:
                if lay.parts:
                    stream[heads[lvl]] = (_concat_perm(model, lvl, lay, maps.get("in"), gen, like), None)
                else:
                    groups = output_unit_groups(model.levels, lvl, lay)
                    perm = _grouped_derangement(widths[lvl], groups, gen, like("out", groups))
                    stream[heads[lvl]] = (_perm_map(perm), perm)
            maps["out"] = stream[heads[lvl]][0]
        out.levels[lvl].load_state_dict(align_level(model.levels[lvl], lay, lvl, maps))  # type: ignore[arg-type]
    return out


#: where a fusion on the CPU hands a matrix to scipy's BLAS / LAPACK as a numpy view of the
#: same memory (no copy): the Gram sums (``dsyrk``) and the closed form's eigendecomposition.  On
#: a GPU both run on the device (``addmm_``, ``torch.linalg.eigh``) and nothing is allowed there.
CPU_LAPACK = ("_eigh_dense", "_add_gram")


@dataclass(frozen=True)
class Transfer:
    """One operation that brought a tensor's values to the host (see :class:`HostTransfers`)."""

    op: str                  # "cpu", "numpy", "tolist", "__array__", "to"
    shape: Tuple[int, ...]
    dtype: str
    where: str               # "module:function:line" of the innermost neurofuse frame


class HostTransfers(TorchFunctionMode):
    """Records every operation that moves a tensor's values to the host while active.

    Host requests are ``.cpu()``, ``.numpy()``, ``.tolist()``, ``numpy.asarray(t)`` and
    ``.to(...)`` towards the CPU; scalar reads (``.item()``, ``float(t)``, ``bool(t)``...) are
    synchronisations and only counted (:attr:`syncs`).  On a GPU every such call on a device
    tensor is a copy over the bus.  On a CPU-only machine fuse with ``device="cpu:0"``: a
    ``.to(fusion_device)`` then names ``cpu:0`` while a request for the host names ``cpu``,
    so the code paths that would copy to the host on a GPU are found without one.

    >>> with HostTransfers() as log:                                   # doctest: +SKIP
    ...     neurofuse.fuse(models, data, device="cpu:0")
    >>> [t for t in log.transfers if len(t.shape) >= 2]                # doctest: +SKIP
    []
    """

    HOST_OPS = frozenset({"cpu", "numpy", "tolist", "__array__"})
    SCALAR_OPS = frozenset({"item", "__float__", "__int__", "__bool__", "__index__"})

    def __init__(self) -> None:
        super().__init__()
        self.transfers: List[Transfer] = []
        self.syncs = 0

    @staticmethod
    def _host_target(t: torch.Tensor, args: tuple, kwargs: dict) -> bool:
        """Whether ``t.to(*args, **kwargs)`` asks for the host: a device tensor moved to the CPU,
        or, on a CPU-only machine, an explicit ``"cpu"`` (``.to(u.device)`` of a CPU tensor
        ``u`` cannot be told apart from a move to the fusion device there and is not counted)."""
        target = kwargs.get("device")
        if target is None:
            target = next((a for a in args[1:] if isinstance(a, (str, torch.device))), None)
        if target is None:
            return False
        try:
            dev = torch.device(target)
        except (RuntimeError, TypeError):
            return False
        if dev.type != "cpu":
            return False
        return t.device.type != "cpu" or (isinstance(target, str) and dev.index is None)

    @staticmethod
    def _where() -> str:
        frame = sys._getframe(2)
        while frame is not None:
            mod = frame.f_globals.get("__name__", "")
            if mod.startswith("neurofuse") and mod != __name__:
                return f"{mod}:{frame.f_code.co_name}:{frame.f_lineno}"
            frame = frame.f_back
        return "?"

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if args and isinstance(args[0], torch.Tensor):
            t = args[0]
            if name in self.HOST_OPS or (name == "to" and self._host_target(t, args, kwargs)):
                self.transfers.append(Transfer(name, tuple(t.shape), str(t.dtype), self._where()))
            elif name in self.SCALAR_OPS:
                self.syncs += 1
        return func(*args, **kwargs)

    def matrices(self, allowed: Sequence[str] = ()) -> List[Transfer]:
        """Transfers of tensors of two or more dimensions, except where ``where`` contains one of
        ``allowed`` (e.g. a CPU-only solver's input)."""
        return [t for t in self.transfers if len(t.shape) >= 2 and not any(a in t.where for a in allowed)]
