"""What a fusion method can be told: its ``Options`` fields with types, defaults and descriptions.

Read from the method's ``Options`` dataclass (field names, annotations, defaults) and the
numpydoc ``Attributes`` sections of its docstrings, so the listing shown by
``neurofuse methods NAME`` cannot drift from the code that validates the options.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import typing
from collections import abc
from typing import Any, Dict, List, Optional, Type

from torch import nn

from ..levels import NeuronMapInfo, neuron_maps
from ._base import FusionMethod, get_method, methods_by_order
from ._options import COMMON_OPTIONS, constraint_of

__all__ = ["OptionInfo", "format_levels", "level_support", "method_options"]

_MISSING = object()


@dataclasses.dataclass(frozen=True)
class OptionInfo:
    """One option of a method: ``--option NAME=VALUE`` on the command line, ``NAME=`` in Python.

    Attributes
    ----------
    name : str
        The key.
    type : str
        Its type as the command line writes it (``int``, ``float``, ``bool``, ``str``, ``list``,
        ``dict``, ``... or null``); values on the command line are JSON (or a bare word).
    default : str
        The default as JSON (``null``, ``true``, ``3``, ``"exact"``), or ``"required"``.
    description : str
        First sentence of the option's entry in the ``Options`` docstring (may be empty).
    common : bool
        Whether it is a setting every method takes (``batch_size``, ``memory_budget``) rather
        than a field of the method's ``Options``.
    allowed : str
        What values it takes, from its declared constraint (``"an integer >= 1"``; may be empty).
    """

    name: str
    type: str
    default: str
    description: str = ""
    common: bool = False
    allowed: str = ""


def _type_name(hint: Any) -> str:
    if hint is Any:
        return "any"
    if hint is type(None):
        return "null"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        names: List[str] = []
        for a in args:
            if a is not type(None) and _type_name(a) not in names:
                names.append(_type_name(a))
        return " or ".join(names + (["null"] if type(None) in args else []))
    if origin in (dict, abc.Mapping, abc.MutableMapping) or hint in (dict, abc.Mapping):
        return "dict"
    if origin in (list, tuple, abc.Sequence) or hint in (list, tuple, abc.Sequence):
        return "list"
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def _default_text(value: Any) -> str:
    if value is _MISSING:
        return "required"
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


#: LaTeX commands of the option docstrings and their plain-text forms (for a terminal).
_LATEX = (
    (r"\^\\top(?![A-Za-z])", "ᵀ"), (r"\\top(?![A-Za-z])", "ᵀ"), (r"\\cdot(?![A-Za-z])", "·"),
    (r"\\propto(?![A-Za-z])", "∝"), (r"\\sum(?![A-Za-z])", "Σ"), (r"\\Pi(?![A-Za-z])", "Π"),
    (r"\\bar\s*(\w)", "\\1\u0304"), (r"\\lVert\s*", "‖"), (r"\s*\\rVert", "‖"),
    (r"\\(?:text|mathrm|operatorname)\{([^{}]*)\}", r"\1"), (r"\\overline\{([^{}]*)\}", r"mean(\1)"),
    (r"\\[,;!]\s*", " "), (r"([_^])\{([^{},]*)\}", r"\1\2"), (r"([_^])\{([^{}]*)\}", r"\1(\2)"),
)


def _plain_math(tex: str) -> str:
    """A LaTeX formula as plain text: ``X^\\top X + \\text{ridge}\\cdot I`` -> ``Xᵀ X + ridge·I``."""
    for pattern, repl in _LATEX:
        tex = re.sub(pattern, repl, tex)
    return re.sub(r"\s*·\s*", "·", tex)


def _first_sentence(text: str) -> str:
    """The first sentence of a docstring entry, without reST markup (``x``, :math:`x`, LaTeX)."""
    plain = re.sub(r":math:`([^`]*)`", lambda m: _plain_math(m.group(1)), text)
    plain = re.sub(r":\w+:`([^`]*)`", r"\1", plain)
    plain = plain.replace("``", "")
    sentence = re.split(r"(?<!e\.g)(?<!i\.e)(?<!etc)\.\s", plain.strip(), maxsplit=1)[0].strip()
    return sentence.rstrip(".") + "." if sentence else ""


def _doc_entries(cls: type) -> Dict[str, str]:
    """``{name: first sentence}`` from the numpydoc ``Attributes`` sections of ``cls`` and its bases."""
    out: Dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        lines = inspect.cleandoc(klass.__doc__ or "").splitlines()
        in_section, names, text = False, [], []

        def flush() -> None:
            if names:
                sentence = _first_sentence(" ".join(text))
                for n in names:
                    out[n] = sentence

        for i, line in enumerate(lines):
            if line.strip() in ("Attributes", "Parameters") and i + 1 < len(lines) \
                    and set(lines[i + 1].strip()) == {"-"}:
                flush()
                in_section, names, text = True, [], []
                continue
            if not in_section or set(line.strip()) == {"-"}:
                continue
            if line and not line.startswith(" "):
                if " : " not in line:  # the end of the section
                    flush()
                    in_section, names, text = False, [], []
                    continue
                flush()
                names, text = [n.strip() for n in line.split(" : ")[0].split(",")], []
            elif line.strip():
                text.append(line.strip())
        flush()
    return out


def _init_default(cls: Type[FusionMethod], name: str) -> Any:
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        param = inspect.signature(init).parameters.get(name)
        if param is not None and param.default is not inspect.Parameter.empty:
            return param.default
    return _MISSING


def method_options(name: str) -> List[OptionInfo]:
    """The options of fusion method ``name``: its ``Options`` fields, then the common settings.

    Parameters
    ----------
    name : str
        A registered method (see :func:`neurofuse.methods.list_methods`).

    Returns
    -------
    list of OptionInfo
        One entry per key, in declaration order.

    Raises
    ------
    ConfigError
        If ``name`` is not a registered method.
    """
    cls = get_method(name)
    opts = cls.Options
    hints = typing.get_type_hints(opts)
    docs = _doc_entries(opts)
    out: List[OptionInfo] = []
    for f in dataclasses.fields(opts):
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = _MISSING
        c = constraint_of(f)
        out.append(OptionInfo(f.name, _type_name(hints.get(f.name, Any)), _default_text(default),
                              docs.get(f.name, ""), allowed=c.describe() if c is not None else ""))
    base_docs = _doc_entries(FusionMethod)
    for key in ("batch_size", "memory_budget"):
        hint: Optional[Any] = typing.get_type_hints(FusionMethod.__init__).get(key)
        out.append(OptionInfo(key, _type_name(hint), _default_text(_init_default(cls, key)),
                              base_docs.get(key, ""), common=True, allowed=COMMON_OPTIONS[key].describe()))
    return out


# ---------------------------------------------------------------------------------------------
# which methods fuse which level (asked of every registered method)
# ---------------------------------------------------------------------------------------------
def level_support(net: nn.Module) -> List[Dict[str, Optional[str]]]:
    """For every level of ``net``, ``{method: None if it can fuse the level, else a one-line
    reason}`` over the registered level-wise methods (:attr:`FusionMethod.fuses_levels`), each
    asked with :meth:`FusionMethod.check_level`."""
    names = [n for n in methods_by_order() if get_method(n).fuses_levels]
    return [{n: get_method(n).check_level(net, i) for n in names}
            for i in range(len(net.levels))]  # type: ignore[arg-type]


def format_levels(net: nn.Module) -> str:
    """A table of the levels: kind, neuron axis, width, layers, the methods that fuse each (with
    the reason of every method that cannot) and the neuron maps made at the level with the tensors
    each moves and along which axis (:func:`neurofuse.levels.neuron_maps`), then the methods for
    the whole model (the whole-model methods fuse any architecture the models share)."""
    rows = level_support(net)
    maps: Dict[int, List[NeuronMapInfo]] = {}
    for m in neuron_maps(net):
        maps.setdefault(m.level, []).append(m)
    widths = net.level_widths()  # type: ignore[operator]
    kinds = getattr(net, "kinds", None) or ["-"] * len(rows)
    names = getattr(net, "level_names", None) or [type(lv).__name__ for lv in net.levels]  # type: ignore[union-attr]
    lines = [f"{'level':>5}  {'kind':<5}  {'axis':<5}  {'width':>5}  layers"]
    for i, (row, w, k, ax, nm) in enumerate(zip(rows, widths, kinds, net.axes, names)):  # type: ignore[arg-type]
        ok = [m for m, r in row.items() if r is None]
        lines.append(f"{i:>5}  {k:<5}  {ax:<5}  {w:>5}  {nm}")
        lines.append(f"{'':>5}  fused by: {', '.join(ok) or 'no level-wise method'}")
        seen: List[str] = []
        for m, r in row.items():
            if r is not None and r not in seen:
                seen.append(r)
                same = [mm for mm, rr in row.items() if rr == r]
                lines.append(f"{'':>5}  not {'/'.join(same)}: {r}")
        for m in maps.get(i, []):
            lines.append(f"{'':>5}  {m.space}-map: {', '.join(m.tensors) or '(no tensors)'}"
                         + (f"  [{m.note}]" if m.note else ""))
    whole = {m: all(r[m] is None for r in rows) for m in rows[0]} if rows else {}
    others = [n for n in methods_by_order() if not get_method(n).fuses_levels]
    lines.append("whole model: " + ", ".join([m for m, ok in whole.items() if ok] + others) + " fuse it"
                 + ("; " + ", ".join(m for m, ok in whole.items() if not ok) + " do not (see above)"
                    if not all(whole.values()) else ""))
    return "\n".join(lines)
