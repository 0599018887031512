"""Method options declared once, with their types and ranges (as scikit-learn's parameter constraints).

Every method's ``Options`` is a frozen dataclass deriving from :class:`MethodOptions`; each field
is declared with :func:`option`, which carries its default and its :class:`Constraint`.  One
validator (:meth:`MethodOptions.__post_init__`) checks every field and raises a one-line
:class:`~neurofuse.errors.ConfigError` naming the option, what it must be and the value given;
``neurofuse methods NAME`` shows the same constraint text.  A subclass adds checks that involve
several fields in its own ``__post_init__`` after calling ``super().__post_init__()``.

>>> @dataclasses.dataclass(frozen=True)
... class MyOptions(MethodOptions):
...     n_init: int = option(10, Interval(int, 1))
...     solver: str = option("exact", OneOf("exact", "sinkhorn"))
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, Optional, Tuple

from .._validate import is_int, is_number
from ..errors import ConfigError

__all__ = ["COMMON_OPTIONS", "AnyOf", "Anything", "Boolean", "Constraint", "Interval", "MethodOptions", "NoOptions",
           "OneOf", "Optional_", "check_options", "check_value", "option"]


class Constraint:
    """What values an option takes: :meth:`check` says whether ``value`` is one, :meth:`describe`
    says in words what it must be (``"an integer >= 1"``)."""

    def check(self, value: Any) -> bool:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


class Interval(Constraint):
    """A number of ``kind`` (``int`` or ``float``; an ``int`` is also a ``float``, a ``bool`` never a
    number) in the interval from ``low`` to ``high`` (``None``: unbounded); ``closed`` says which
    ends belong to it: ``"both"``, ``"left"``, ``"right"`` or ``"neither"``."""

    def __init__(self, kind: type, low: Optional[float] = None, high: Optional[float] = None,
                 closed: str = "both") -> None:
        if kind not in (int, float) or closed not in ("both", "left", "right", "neither"):
            raise ValueError(f"bad interval {kind}, {closed!r}")
        self.kind, self.low, self.high, self.closed = kind, low, high, closed

    def check(self, value: Any) -> bool:
        if not (is_int(value) if self.kind is int else is_number(value)):
            return False
        v = float(value)
        if self.low is not None and (v < self.low or (v == self.low and self.closed in ("right", "neither"))):
            return False
        if self.high is not None and (v > self.high or (v == self.high and self.closed in ("left", "neither"))):
            return False
        return True

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        parts = []
        if self.low is not None:
            parts.append(f"{'>=' if self.closed in ('both', 'left') else '>'} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<=' if self.closed in ('both', 'right') else '<'} {self.high:g}")
        return what + (" " + " and ".join(parts) if parts else "")


class OneOf(Constraint):
    """One of the given values (compared with ``==``; strings stay case-sensitive)."""

    def __init__(self, *choices: Any) -> None:
        self.choices: Tuple[Any, ...] = choices

    def check(self, value: Any) -> bool:
        return not isinstance(value, (list, dict)) and any(
            type(value) is type(c) and value == c for c in self.choices)

    def describe(self) -> str:
        if len(self.choices) == 1:
            return repr(self.choices[0])
        return "one of " + ", ".join(repr(c) for c in self.choices)


class Boolean(Constraint):
    """``True`` or ``False``."""

    def check(self, value: Any) -> bool:
        return isinstance(value, bool)

    def describe(self) -> str:
        return "true or false"


class Anything(Constraint):
    """Any value of the described kind; the option's consumer validates it (an array of class
    weights, a nested config)."""

    def __init__(self, description: str, test: Optional[Callable[[Any], bool]] = None) -> None:
        self.description = description
        self.test = test

    def check(self, value: Any) -> bool:
        return True if self.test is None else bool(self.test(value))

    def describe(self) -> str:
        return self.description


class Optional_(Constraint):
    """``None`` or a value of ``inner``."""

    def __init__(self, inner: Constraint) -> None:
        self.inner = inner

    def check(self, value: Any) -> bool:
        return value is None or self.inner.check(value)

    def describe(self) -> str:
        return f"null or {self.inner.describe()}"


class AnyOf(Constraint):
    """A value of any of the given constraints (``AnyOf(OneOf("auto"), Interval(float, 0))``:
    ``"auto"`` or a number >= 0)."""

    def __init__(self, *alternatives: Constraint) -> None:
        self.alternatives: Tuple[Constraint, ...] = alternatives

    def check(self, value: Any) -> bool:
        return any(c.check(value) for c in self.alternatives)

    def describe(self) -> str:
        return " or ".join(c.describe() for c in self.alternatives)


def option(default: Any, constraint: Constraint) -> Any:
    """A dataclass field with ``default`` and its ``constraint`` (checked by :class:`MethodOptions`)."""
    return dataclasses.field(default=default, metadata={"constraint": constraint})


def constraint_of(field: dataclasses.Field) -> Optional[Constraint]:
    """The :class:`Constraint` declared for ``field`` (``None`` if none)."""
    return field.metadata.get("constraint")


def check_value(name: str, value: Any, constraint: Constraint) -> None:
    """Raise a one-line :class:`~neurofuse.errors.ConfigError` if ``value`` of option ``name`` is
    not one ``constraint`` allows."""
    if not constraint.check(value):
        shown = value if not isinstance(value, float) or math.isfinite(value) else repr(value)
        raise ConfigError(f"option {name!r} must be {constraint.describe()}, got {shown!r}")


def check_options(options: Any) -> None:
    """Check every declared field of the ``options`` dataclass against its constraint."""
    for f in dataclasses.fields(options):
        c = constraint_of(f)
        if c is not None:
            check_value(f.name, getattr(options, f.name), c)


#: the constraints of the settings every method takes (:class:`~neurofuse.methods.FusionMethod`
#: arguments, not ``Options`` fields): checked by the method, shown by ``neurofuse methods NAME``
COMMON_OPTIONS: Dict[str, Constraint] = {
    "batch_size": Interval(int, 1),
    # bytes the working set may take, "auto" (the machine's available memory) or None (unbounded):
    # neurofuse.methods._memory
    "memory_budget": Optional_(AnyOf(OneOf("auto"), Interval(int, 0))),
}


@dataclasses.dataclass(frozen=True)
class MethodOptions:
    """Base of every method's options: validates each field against its declared constraint."""

    def __post_init__(self) -> None:
        check_options(self)


@dataclasses.dataclass(frozen=True)
class NoOptions(MethodOptions):
    """A method without settings of its own."""
