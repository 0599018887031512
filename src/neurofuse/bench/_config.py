"""Benchmark configs: declarative JSON files, typed and validated when loaded.

A config file (``neurofuse/bench/configs/<name>.json``) has the keys

``name``, ``title``, ``paper`` (what the paper reports it as), ``description``,
``common`` (settings shared by every scale) and ``scales`` (``smoke``, ``cpu``, ``full``: settings
that replace the common ones, key by key).

The merged settings of one scale become a :class:`BenchConfig`.  Every key is checked: an unknown
key, a wrong type or a value out of range raises :class:`~neurofuse.errors.ConfigError` with a
one-line message naming the file, the scale and the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ..errors import ConfigError

__all__ = ["BenchConfig", "FinetuneSpec", "ParetoSpec", "SCALES", "SECTIONS", "FIGURES", "SweepSpec",
           "config_dir", "list_configs", "load_config", "parse_config"]

#: the scales every shipped config defines
SCALES = ("smoke", "cpu", "full")
#: report sections a config may ask for
SECTIONS = ("accuracy", "importance", "runtime", "sweep", "pareto")
#: figures a config may ask for
FIGURES = ("bars", "clustering", "landscape", "pareto")
PARTITIONS = ("dirichlet", "sharded", "iid", "full")
#: fields of :class:`neurofuse.training.TrainConfig` a config may set (``seed``/``device`` are the run's)
TRAIN_KEYS = ("epochs", "lr", "weight_decay", "batch_size", "warmup_epochs", "lr_min", "label_smoothing")
_TOP_KEYS = ("name", "title", "paper", "description", "common", "scales")


def config_dir() -> Path:
    """The directory of the configs shipped with the package."""
    return Path(__file__).resolve().parent / "configs"


def list_configs() -> List[str]:
    """Names of the shipped configs (file stems), sorted."""
    return sorted(p.stem for p in config_dir().glob("*.json"))


# ---------------------------------------------------------------------------------------------
# small typed checks
# ---------------------------------------------------------------------------------------------
class _Ctx:
    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, key: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.where}: {key}: {msg}")

    def int_(self, key: str, v: Any, lo: int = 0) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise self.fail(key, f"expected an integer >= {lo}, got {v!r}")
        return v

    def num(self, key: str, v: Any, lo: float = 0.0, hi: float = math.inf, lo_open: bool = False) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or v < lo or v > hi or (lo_open and v == lo):
            raise self.fail(key, f"expected a number in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}")
        return float(v)

    def str_(self, key: str, v: Any, choices: Optional[Sequence[str]] = None) -> str:
        if not isinstance(v, str) or not v:
            raise self.fail(key, f"expected a non-empty string, got {v!r}")
        if choices is not None and v not in choices:
            raise self.fail(key, f"unknown value {v!r}; choose one of {list(choices)}")
        return v

    def list_(self, key: str, v: Any, item, nonempty: bool = True) -> list:
        if not isinstance(v, list) or (nonempty and not v):
            raise self.fail(key, f"expected a{' non-empty' if nonempty else ''} list, got {v!r}")
        out = [item(f"{key}[{i}]", x) for i, x in enumerate(v)]
        if len(set(map(json.dumps, out))) != len(out):
            raise self.fail(key, f"has duplicate entries: {v!r}")
        return out

    def dict_(self, key: str, v: Any) -> dict:
        if not isinstance(v, dict):
            raise self.fail(key, f"expected an object, got {v!r}")
        return v

    def keys(self, key: str, d: Mapping[str, Any], allowed: Sequence[str]) -> None:
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise self.fail(key, f"unknown key(s) {unknown}; valid: {sorted(allowed)}")


# ---------------------------------------------------------------------------------------------
# typed sections
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FinetuneSpec:
    """Fine-tuning after fusion (the paper's table 3): which methods, and the
    :class:`neurofuse.finetune.FinetuneConfig` settings (``seed`` and ``device`` are the run's).

    ``"ensemble"`` in ``methods`` fine-tunes every base model with the same settings and ensembles
    them (the paper's fine-tuned ensemble column).
    """

    methods: Tuple[str, ...]
    settings: Mapping[str, Any]
    #: training samples to fine-tune on (stratified subsample of the run's training set; None: all)
    samples: Optional[int] = None


@dataclass(frozen=True)
class SweepSpec:
    """Runtime against fusion-set size (the paper's table 7, second part)."""

    methods: Tuple[str, ...]
    importance: str
    fusion_samples: Tuple[int, ...]


@dataclass(frozen=True)
class ParetoSpec:
    """Accuracy against parameter count: one method at several fused widths (partial fusion).

    ``widths`` are multipliers of the base width; those above the number of models of a split
    (more neurons than the models have) are not run for that split.
    """

    method: str
    importance: str
    widths: Tuple[float, ...]
    class_shares: bool = True


@dataclass(frozen=True)
class BenchConfig:
    """The settings of one benchmark at one scale (see the module docstring).

    Attributes
    ----------
    name, title, paper, description, scale : str
        What the benchmark is and which scale these settings are.
    dataset : str
        Dataset name (:func:`neurofuse.data.load_dataset`).
    train_subsample : int or None
        Use a stratified subsample of this many training images (seed 0) instead of the whole
        training set (documented CPU shortcut); ``None``: all.
    arch, size : str
        Zoo architecture and named size of the base models.
    partition : str
        ``dirichlet``, ``sharded``, ``iid`` or ``full`` (every model sees the whole training set;
        the models differ by their seed).
    ratio : float
        Dirichlet min/max concentration ratio (paper: 0.2).
    splits : tuple of int
        Numbers of base models (the table's columns).
    seeds : tuple of int
        Seeds of the split, the initialisation and the training (the paper: 5 or 3).
    train : dict
        Base-model training (:class:`neurofuse.training.TrainConfig` fields); ``epochs`` may be an
        int or an object mapping a split (``"2"``) to its epochs.
    val_fraction : float
        Share of every model's data held out to select its checkpoint (never the test set).
    fusion_samples : int
        Size of the class-balanced fusion set (drawn from the training data).
    methods, importances : tuple of str
        Fusion methods (registry names) and the importance scores of those that use them.
    method_options : dict
        Per method, options of its ``Options`` dataclass; the value ``"class_shares"`` stands for
        the per-class data shares of the base models.
    finetune : FinetuneSpec or None
        Fine-tune after fusion (table 3).
    sweep : SweepSpec or None
        Seconds against fusion-set size.
    pareto : ParetoSpec or None
        Accuracy against parameter count at several fused widths.
    report : tuple of str
        Report sections (:data:`SECTIONS`).
    figures : tuple of str
        Figures (:data:`FIGURES`).
    figure_options : dict
        ``clustering``: ``width`` (10), ``epochs``; ``landscape``: ``grid`` (points per axis),
        ``epochs``, ``size``, ``method``, ``margin``.
    device : str
        Default torch device (``--device`` overrides it).
    """

    name: str
    title: str
    paper: str
    description: str
    scale: str
    dataset: str
    arch: str
    size: str
    splits: Tuple[int, ...]
    seeds: Tuple[int, ...]
    fusion_samples: int
    methods: Tuple[str, ...]
    train: Mapping[str, Any]
    train_subsample: Optional[int] = None
    partition: str = "dirichlet"
    ratio: float = 0.2
    val_fraction: float = 0.1
    importances: Tuple[str, ...] = ("uniform",)
    method_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    finetune: Optional[FinetuneSpec] = None
    sweep: Optional[SweepSpec] = None
    pareto: Optional[ParetoSpec] = None
    report: Tuple[str, ...] = ("accuracy",)
    figures: Tuple[str, ...] = ("bars",)
    figure_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    device: str = "cpu"

    def epochs_for(self, split: int) -> int:
        """Base-model training epochs of a split of ``split`` models."""
        e = self.train["epochs"]
        return int(e) if isinstance(e, int) else int(e[str(split)])

    def train_config(self, split: int) -> Dict[str, Any]:
        """The training settings of a split (``TrainConfig`` keyword arguments)."""
        out = {k: v for k, v in self.train.items() if k != "epochs"}
        out["epochs"] = self.epochs_for(split)
        return out

    def with_seeds(self, k: int) -> "BenchConfig":
        """The same config with ``k`` seeds: the first ``k`` listed, then consecutive ones."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"--seeds must be a positive integer, got {k!r}")
        seeds = list(self.seeds[:k])
        nxt = max(self.seeds) + 1
        while len(seeds) < k:
            seeds.append(nxt)
            nxt += 1
        return dataclasses.replace(self, seeds=tuple(seeds))

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready dict of every setting (written into ``results.json``)."""
        d = dataclasses.asdict(self)
        return json.loads(json.dumps(d, default=list))


_FIELD_KEYS = tuple(f.name for f in dataclasses.fields(BenchConfig)
                    if f.name not in ("name", "title", "paper", "description", "scale"))


def _registry_names() -> Tuple[List[str], List[str], List[str]]:
    from ..data import list_datasets
    from ..importance import importance_methods
    from ..methods import list_methods

    return list_methods(), importance_methods(), list_datasets()


def _option_fields(method: str) -> Optional[List[str]]:
    from ..methods import get_method

    cls = get_method(method)
    common = ["batch_size", "width"]
    return [f.name for f in dataclasses.fields(cls.Options)] + common


def parse_config(doc: Mapping[str, Any], scale: str, source: str = "<config>") -> BenchConfig:
    """Validate a config document and return the merged settings of ``scale``."""
    ctx = _Ctx(source)
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{source}: a config must be a JSON object")
    ctx.keys("(top level)", doc, _TOP_KEYS)
    for k in ("name", "title", "common", "scales"):
        if k not in doc:
            raise ctx.fail(k, "missing")
    name = ctx.str_("name", doc["name"])
    common = ctx.dict_("common", doc["common"])
    scales = ctx.dict_("scales", doc["scales"])
    ctx.keys("scales", scales, SCALES)
    if scale not in SCALES:
        raise ConfigError(f"unknown scale {scale!r}; choose one of {list(SCALES)}")
    if scale not in scales:
        raise ConfigError(f"{source}: config {name!r} has no scale {scale!r} (it has {sorted(scales)})")
    over = ctx.dict_(f"scales.{scale}", scales[scale])
    ctx.keys("common", common, _FIELD_KEYS)
    ctx.keys(f"scales.{scale}", over, _FIELD_KEYS)
    s: Dict[str, Any] = {**common, **over}
    ctx = _Ctx(f"{source} [{scale}]")
    for k in ("dataset", "arch", "size", "splits", "seeds", "fusion_samples", "methods", "train"):
        if k not in s:
            raise ctx.fail(k, "missing")

    methods_known, importances_known, datasets_known = _registry_names()
    kw: Dict[str, Any] = {
        "name": name, "title": ctx.str_("title", doc["title"]),
        "paper": str(doc.get("paper", "")), "description": str(doc.get("description", "")),
        "scale": scale,
    }
    kw["dataset"] = ctx.str_("dataset", s["dataset"], datasets_known)
    kw["arch"] = ctx.str_("arch", s["arch"])
    kw["size"] = ctx.str_("size", s["size"], ("tiny", "small", "paper"))
    if s.get("train_subsample") is not None:
        kw["train_subsample"] = ctx.int_("train_subsample", s["train_subsample"], 10)
    kw["partition"] = ctx.str_("partition", s.get("partition", "dirichlet"), PARTITIONS)
    kw["ratio"] = ctx.num("ratio", s.get("ratio", 0.2), 0.0, 1.0, lo_open=True)
    kw["splits"] = tuple(ctx.list_("splits", s["splits"], lambda k, v: ctx.int_(k, v, 1)))
    kw["seeds"] = tuple(ctx.list_("seeds", s["seeds"], lambda k, v: ctx.int_(k, v, 0)))
    kw["val_fraction"] = ctx.num("val_fraction", s.get("val_fraction", 0.1), 0.0, 0.9)
    kw["fusion_samples"] = ctx.int_("fusion_samples", s["fusion_samples"], 1)
    kw["methods"] = tuple(ctx.list_("methods", s["methods"],
                                    lambda k, v: ctx.str_(k, v, methods_known), nonempty=False))
    kw["importances"] = tuple(ctx.list_("importances", s.get("importances", ["uniform"]),
                                        lambda k, v: ctx.str_(k, v, importances_known)))

    train = dict(ctx.dict_("train", s["train"]))
    ctx.keys("train", train, TRAIN_KEYS)
    if "epochs" not in train:
        raise ctx.fail("train.epochs", "missing")
    ep = train["epochs"]
    if isinstance(ep, dict):
        for split in kw["splits"]:
            if str(split) not in ep:
                raise ctx.fail("train.epochs", f"no epochs for split {split} (keys are split sizes as strings)")
        for k, v in ep.items():
            ctx.int_(f"train.epochs.{k}", v, 1)
    else:
        ctx.int_("train.epochs", ep, 1)
    for k in ("lr", "weight_decay", "lr_min", "label_smoothing"):
        if k in train:
            ctx.num(f"train.{k}", train[k], 0.0, 1.0 if k == "label_smoothing" else math.inf)
    for k in ("batch_size", "warmup_epochs"):
        if k in train:
            ctx.int_(f"train.{k}", train[k], 1 if k == "batch_size" else 0)
    kw["train"] = train

    mo = ctx.dict_("method_options", s.get("method_options", {}))
    for m, opts in mo.items():
        ctx.str_(f"method_options key {m!r}", m, methods_known)
        ctx.dict_(f"method_options.{m}", opts)
        ctx.keys(f"method_options.{m}", opts, _option_fields(m) or [])
    kw["method_options"] = mo

    if s.get("finetune") is not None:
        from ..finetune import FinetuneConfig

        ft = dict(ctx.dict_("finetune", s["finetune"]))
        ft_fields = [f.name for f in dataclasses.fields(FinetuneConfig) if f.name not in ("seed", "device")]
        ctx.keys("finetune", ft, ["methods", "samples", *ft_fields])
        ft_methods = tuple(ctx.list_("finetune.methods", ft.pop("methods", None),
                                     lambda k, v: ctx.str_(k, v, methods_known)))
        samples = ft.pop("samples", None)
        if samples is not None:
            ctx.int_("finetune.samples", samples, 10)
        try:
            FinetuneConfig(**ft)
        except ConfigError as exc:
            raise ctx.fail("finetune", str(exc)) from None
        kw["finetune"] = FinetuneSpec(ft_methods, ft, samples)

    if s.get("sweep") is not None:
        sw = ctx.dict_("sweep", s["sweep"])
        ctx.keys("sweep", sw, ("methods", "importance", "fusion_samples"))
        kw["sweep"] = SweepSpec(
            tuple(ctx.list_("sweep.methods", sw.get("methods"), lambda k, v: ctx.str_(k, v, methods_known))),
            ctx.str_("sweep.importance", sw.get("importance", "uniform"), importances_known),
            tuple(ctx.list_("sweep.fusion_samples", sw.get("fusion_samples"), lambda k, v: ctx.int_(k, v, 1))),
        )
    if s.get("pareto") is not None:
        pa = ctx.dict_("pareto", s["pareto"])
        ctx.keys("pareto", pa, ("method", "importance", "widths", "class_shares"))
        method = ctx.str_("pareto.method", pa.get("method", "kf-linear"), methods_known)
        from ..methods import get_method

        if not get_method(method).supports_width:
            raise ctx.fail("pareto.method", f"{method!r} keeps the models' widths; use 'kf-linear' or 'kf-gradient'")
        cs = pa.get("class_shares", True)
        if not isinstance(cs, bool):
            raise ctx.fail("pareto.class_shares", f"expected true or false, got {cs!r}")
        kw["pareto"] = ParetoSpec(
            method, ctx.str_("pareto.importance", pa.get("importance", "uniform"), importances_known),
            tuple(ctx.list_("pareto.widths", pa.get("widths"), lambda k, v: ctx.num(k, v, 1.0))), cs)
    kw["report"] = tuple(ctx.list_("report", s.get("report", ["accuracy"]),
                                   lambda k, v: ctx.str_(k, v, SECTIONS)))
    if "sweep" in kw["report"] and "sweep" not in kw:
        raise ctx.fail("report", "asks for a 'sweep' section but the config has no 'sweep'")
    kw["figures"] = tuple(ctx.list_("figures", s.get("figures", ["bars"]),
                                    lambda k, v: ctx.str_(k, v, FIGURES), nonempty=False))
    fo = ctx.dict_("figure_options", s.get("figure_options", {}))
    ctx.keys("figure_options", fo, ("clustering", "landscape"))
    allowed = {"clustering": ("width", "epochs", "models"),
               "landscape": ("grid", "epochs", "size", "method", "margin", "eval_samples")}
    for k, v in fo.items():
        ctx.keys(f"figure_options.{k}", ctx.dict_(f"figure_options.{k}", v), allowed[k])
    kw["figure_options"] = fo
    kw["device"] = ctx.str_("device", s.get("device", "cpu"))
    if ("pareto" in kw["report"] or "pareto" in kw["figures"]) and "pareto" not in kw:
        raise ctx.fail("report", "asks for a 'pareto' section or figure but the config has no 'pareto'")
    if not kw["methods"] and kw.get("sweep") is None and kw.get("pareto") is None:
        raise ctx.fail("methods", "no methods, no sweep and no pareto: nothing to run")
    return BenchConfig(**kw)


def _resolve(name_or_path: Union[str, Path]) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".json" or p.exists():
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        return p
    cand = config_dir() / f"{name_or_path}.json"
    if not cand.is_file():
        raise ConfigError(f"unknown benchmark {str(name_or_path)!r}; choose one of {list_configs()} "
                          f"or give a path to a .json config")
    return cand


def load_config(name_or_path: Union[str, Path], scale: str) -> BenchConfig:
    """Load a shipped config by name (``"table1"``) or a config file by path, at ``scale``."""
    path = _resolve(name_or_path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path.name}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    return parse_config(doc, scale, source=path.name)
