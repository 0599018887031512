"""The ``neurofuse`` command line: ``demo``, ``train``, ``fuse``, ``finetune``, ``eval``, ``align``,
``methods``, ``levels`` (and ``bench``).

Every user error (bad models, missing data, corrupt checkpoints, existing outputs) ends in one line
on stderr, ``neurofuse: error: ...``, and exit status 2; inputs are never overwritten.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence

__all__ = ["main"]

log = logging.getLogger("neurofuse")


def _width(text: str) -> Any:
    """``--width``: an int (every level), a float multiplier (``0.5``) or a list ``32,64``."""
    try:
        if "," in text:
            return [int(t) for t in text.split(",") if t.strip()]
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, a float or a comma-separated list, got {text!r}")


def _add_data_args(p: argparse.ArgumentParser, default_dataset: Optional[str] = "digits") -> None:
    from .data import list_datasets

    p.add_argument("--dataset", default=default_dataset, choices=list_datasets(),
                   help="dataset (default: %(default)s; digits needs no files)" if default_dataset else
                   "dataset (default: the one recorded in the checkpoints)")
    p.add_argument("--data-dir", default=None,
                   help="directory with the dataset files (default: $NEUROFUSE_DATA, then ../shared/data)")


def _add_split_args(p: argparse.ArgumentParser) -> None:
    from .models import zoo_architectures

    p.add_argument("--arch", default="mlp", choices=zoo_architectures(), help="architecture (default: mlp)")
    p.add_argument("--size", default="small", choices=["tiny", "small", "paper"],
                   help="named model size (default: small)")
    p.add_argument("--models", type=_pos_int, default=4, help="number of base models (default: 4)")
    p.add_argument("--partition", default="dirichlet", choices=["dirichlet", "sharded", "iid"],
                   help="how the training data is split among the models (default: dirichlet)")
    p.add_argument("--ratio", type=float, default=0.2,
                   help="Dirichlet min/max concentration ratio (default: %(default)s)")
    p.add_argument("--epochs", type=_pos_int, default=None, help="training epochs per base model (default: per dataset)")
    p.add_argument("--lr", type=float, default=1e-3, help="training learning rate (default: %(default)s)")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="seed of the split, training and fusion")


def _split_config(a: argparse.Namespace):
    from .experiment import SplitConfig

    return SplitConfig(arch=a.arch, size=a.size, n_models=a.models, partition=a.partition,
                       ratio=a.ratio, seed=a.seed, epochs=a.epochs, lr=a.lr)


def _check_outputs(outputs: Sequence[Any], force: bool, inputs: Sequence[Any] = (),
                   data_dir: Any = None, check_data: bool = True) -> None:
    """:func:`neurofuse._io.check_outputs`, with the data directory of ``--data-dir`` protected when
    the command reads a dataset (``check_data``)."""
    from ._io import check_outputs

    data_root: Optional[Path] = None
    if check_data:
        from .data import resolve_data_dir

        try:
            data_root = resolve_data_dir(data_dir).resolve()
        except (OSError, RuntimeError):
            data_root = None
    check_outputs(outputs, force, inputs, data_root)


def _checkpoint_inputs(paths: Sequence[str]) -> List[Path]:
    """The checkpoint files and the architecture sidecars that loading them reads."""
    out: List[Path] = []
    for p in map(Path, paths):
        out.append(p)
        if p.suffix.lower() != ".safetensors":   # PyTorch files (by content) read a sidecar config
            out += [p.with_name(p.name + ".json"), p.with_suffix(".json")]
    return out


def _check_device(text: str) -> None:
    """``--device``: a torch device that exists on this machine."""
    import torch

    from .errors import ConfigError

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"unknown --device {text!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return
    backend = getattr(torch, dev.type, None) if dev.type != "mps" else getattr(torch.backends, "mps", None)
    available = getattr(backend, "is_available", None)
    if dev.type == "meta" or not callable(available):
        raise ConfigError(f"--device {text!r} cannot run neurofuse; use cpu, cuda or cuda:N")
    if not available():
        raise ConfigError(f"--device {text!r}: {dev.type} is not available on this machine "
                          f"(torch {torch.__version__}); use --device cpu")
    count = getattr(backend, "device_count", None)
    if dev.index is not None and callable(count) and dev.index >= count():
        raise ConfigError(f"--device {text!r}: this machine has {count()} {dev.type} device(s); "
                          f"use an index below {count()}")


def _check_args(a: argparse.Namespace) -> None:
    """Checks that need no work, run on every command before it starts."""
    from ._validate import MAX_SEED

    from .errors import ConfigError

    seed = getattr(a, "seed", None)
    if isinstance(seed, int) and not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"--seed must be in [0, {MAX_SEED}], got {seed}")
    device = getattr(a, "device", None)
    if isinstance(device, str):
        _check_device(device)
    if getattr(a, "distill_extra", 0) and not getattr(a, "distill", None):
        raise ConfigError(f"--distill-extra {a.distill_extra} needs --distill EPOCHS (it adds images "
                          "to the distillation); add --distill or drop --distill-extra")


def _error_line(exc: BaseException) -> str:
    """One line for an exception that is not a NeurofuseError but has a clear user cause."""
    if isinstance(exc, OSError):
        where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        what = exc.strerror or str(exc) or type(exc).__name__
        return (f"{where}: {what}" if where else what) + "; check the path, its permissions and free space"
    if isinstance(exc, RecursionError):
        return "an input is nested too deeply to read (deeply nested JSON or config); it is corrupt or hostile"
    if isinstance(exc, OverflowError):
        return f"a number is too large ({exc}); use a smaller value"
    return ("out of memory (" + (str(exc).splitlines() or [type(exc).__name__])[0][:160]
            + "); use fewer --fusion-samples, a smaller model or another --device")


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "defaultcpuallocator" in text
                                              or "can't allocate memory" in text)


# -- commands -------------------------------------------------------------------------------

def cmd_methods(a: argparse.Namespace) -> int:
    from .importance import importance_methods
    from .methods import get_method, methods_by_order

    if getattr(a, "hf", False):
        from .hf._cli import print_methods

        return print_methods()
    if getattr(a, "name", None):
        return _show_method(a.name)
    names = methods_by_order()
    col = max(len(n) for n in names)
    for name in names:
        cls = get_method(name)
        n = (f"{cls.max_models} models" if cls.max_models and cls.max_models == max(2, cls.min_models)
             else f"up to {cls.max_models} models" if cls.max_models else "N models")
        imp = "importance: " + ", ".join(importance_methods()) if cls.uses_importance else "no importance"
        width = "; fused width per level (--width)" if cls.supports_width else ""
        print(f"{name:{col}s} {cls.summary}\n{'':{col}s} [{n}; {imp}{width}]")
    print("\nwhich methods fuse Hugging Face models (fuse --hf): neurofuse methods --hf")
    return 0


def _show_method(name: str) -> int:
    """``neurofuse methods NAME``: the method's summary and its ``--option`` keys."""
    import textwrap

    from .methods import get_method, method_options

    cls = get_method(name)
    print(f"{name}: {cls.summary}")
    rows = method_options(name)
    own = [o for o in rows if not o.common]
    for title, opts in (("options (--option KEY=VALUE; values are JSON or a bare word)", own),
                        ("settings every method takes (--option KEY=VALUE)", [o for o in rows if o.common])):
        print(f"\n{title}:" if opts else f"\n{title[:7]}: none")
        for o in opts:
            allowed = f"; {o.allowed}" if o.allowed else ""
            print(f"  {o.name} ({o.type}, default {o.default}{allowed})")
            if o.description:
                print(textwrap.fill(o.description, width=96, initial_indent="      ",
                                    subsequent_indent="      "))
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import DemoConfig, format_table, run_demo

    _check_outputs([(a.out, "dir"), (Path(a.out) / "results.json", ".json"),
                    (Path(a.out) / "accuracy.png", ".png")], a.force, data_dir=a.data_dir)
    cfg = DemoConfig(out=a.out, dataset=a.dataset, data_dir=a.data_dir, split=_split_config(a),
                     fusion_samples=a.fusion_samples, force=a.force, progress=not a.no_progress,
                     methods=a.methods.split(",") if a.methods else None, device=a.device,
                     finetune=a.finetune)
    doc = run_demo(cfg)
    print(f"neurofuse demo: {doc['dataset']}, {doc['arch']}, {doc['n_models']} models, "
          f"{doc['partition']} split, seed {doc['seed']}, {doc['fusion_samples']} fusion samples")
    print(format_table(doc))
    print(f"wrote {Path(a.out) / 'results.json'} and {Path(a.out) / 'accuracy.png'} "
          f"({doc['seconds_total']:.0f} s)")
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    from ._io import write_folder
    from .checkpoint import save_json, save_model
    from .data import load_dataset
    from .experiment import train_base_models

    out = Path(a.out)
    names = [f"model_{i}.safetensors" for i in range(a.models)] + ["split.json"]
    # the folder is written whole and swapped in: a run killed half-way never mixes two runs' models
    _check_outputs([(out, "folder")], a.force, data_dir=a.data_dir)
    ds = load_dataset(a.dataset, a.data_dir)
    cfg = _split_config(a)
    base = train_base_models(ds, cfg, progress=not a.no_progress, device=a.device)

    def write(tmp: Path) -> None:
        for i, (m, part) in enumerate(zip(base.models, base.parts)):
            save_model(m, tmp / names[i], metadata={
                "dataset": ds.name, "partition": cfg.partition, "seed": cfg.seed, "model_index": i,
                "train_samples": int(len(part)), "val_accuracy": base.histories[i]["best_val_accuracy"]})
        save_json({"dataset": ds.name, "partition": cfg.partition, "n_models": cfg.n_models,
                   "seed": cfg.seed, "arch": cfg.arch, "size": cfg.size,
                   "parts": [p.tolist() for p in base.parts],
                   "class_shares": base.class_shares.tolist()}, tmp / names[-1])

    write_folder(out, write, force=a.force)
    for i, part in enumerate(base.parts):
        print(f"{out / names[i]}: {len(part)} training samples, validation accuracy "
              f"{100 * (base.histories[i]['best_val_accuracy'] or 0):.1f}%")
    print(f"wrote {out / names[-1]} (partition indices and class shares)")
    return 0


def _load_all(paths: Sequence[str], factory: Optional[str] = None) -> List[Any]:
    """The checkpoints as models: zoo checkpoints from their own config, or, with ``factory``
    (``FILE.py:FUNCTION``), state dicts loaded into ``FUNCTION()`` models."""
    from .checkpoint import load_model

    if factory is None:
        return [load_model(p) for p in paths]
    from .errors import ConfigError
    from .interop import load_factory, load_state_dict
    from torch import nn

    make = load_factory(factory)
    models = []
    for p in paths:
        model = make()
        if not isinstance(model, nn.Module):
            raise ConfigError(f"--model-factory {factory} returns a {type(model).__name__}, not a torch.nn.Module")
        models.append(load_state_dict(model, p).eval())
    return models


def _dataset_of(paths: Sequence[str], explicit: Optional[str]) -> str:
    from .checkpoint import read_config, read_factory_metadata
    from .errors import DataError, NeurofuseError

    if explicit:
        return explicit
    for p in paths:
        fused = read_factory_metadata(p)
        if fused is not None and isinstance(fused.get("dataset"), str):
            return fused["dataset"]
        try:
            name = read_config(p).get("metadata", {}).get("dataset")
        except NeurofuseError:
            if Path(p).suffix.lower() == ".safetensors":
                raise   # a corrupt or foreign checkpoint: say that, not "pass --dataset"
            name = None  # legacy .pt files have no metadata; their load errors come later
        if name:
            return str(name)
    from .checkpoint import load_model

    for p in paths:   # a file that cannot be loaded says why, rather than "pass --dataset"
        load_model(p)
    raise DataError("cannot tell which dataset the checkpoints were trained on; pass --dataset")


def cmd_fuse(a: argparse.Namespace) -> int:
    if a.hf:   # the checkpoints are Hugging Face save_pretrained folders
        from .hf._cli import fuse_hf

        return fuse_hf(a, _parse_options(a.option))
    out = Path(a.out)
    inputs = _checkpoint_inputs(a.checkpoints)
    if a.head_weights:
        inputs.append(Path(a.checkpoints[0]).parent / "split.json")
    if a.model_factory:
        inputs.append(Path(a.model_factory.rsplit(":", 1)[0]))
    _check_outputs([(out, ".safetensors")], a.force, inputs, data_dir=a.data_dir)
    _parse_options(a.option)  # bad or clashing options fail before any work
    if a.model_factory or a.auto_levels:
        return _fuse_factory(a, out)
    if a.distributed:
        return _fuse_distributed(a)
    return _fuse_and_save(a, out)


def _fuse_distributed(a: argparse.Namespace) -> int:
    """``fuse --distributed`` under torchrun: every rank fuses on its shard, rank 0 writes."""
    from . import distributed
    from .errors import ConfigError

    if a.finetune or a.depth or a.distill:
        raise ConfigError("--distributed fuses level by level on shards of the fusion set; it "
                          "does not combine with --finetune, --distill or --depth (run those afterwards)")
    distributed.init(device=a.device)
    try:
        return _fuse_and_save(a, Path(a.out), distributed=True, main=distributed.is_main())
    finally:
        distributed.shutdown()


def _fuse_and_save(a: argparse.Namespace, out: Path, distributed: bool = False, main: bool = True) -> int:
    from .api import fuse
    from .checkpoint import save_model
    from .data import load_dataset
    from .experiment import fusion_set
    from .training import evaluate

    models = _load_all(a.checkpoints)
    ds = load_dataset(_dataset_of(a.checkpoints, a.dataset), a.data_dir)
    fusion = fusion_set(ds, a.fusion_samples, seed=a.seed)
    options = _parse_options(a.option)
    if a.head_weights:
        options["class_weights"] = _class_shares_for(a.checkpoints)
    if a.depth:
        options.update(depth_metric=a.depth_metric, balance=a.balance)
    finetune, finetune_data = _finetune_args(a, ds)
    distill, distill_data = _distill_args(a, ds)
    if distributed:
        options["distributed"] = True
    fused = fuse(models, fusion, method=a.method, importance=a.importance, width=a.width,
                 seed=a.seed, progress=not a.no_progress and main, device=a.device, repair=a.repair,
                 finetune=finetune, finetune_data=finetune_data, depth=a.depth,
                 reference=a.reference, distill=distill, distill_data=distill_data, **options)
    options.pop("distributed", None)
    if not main:
        return 0
    from .methods import get_method

    label = f"{a.method}/{a.importance}" if get_method(a.method).uses_importance else a.method
    steps = ([f"depth {a.depth} ({a.balance})"] if a.depth else []) + (["REPAIR"] if a.repair else []) + (
        [f"distilled {a.distill} epochs"] if a.distill else []) + (
        [f"fine-tuned {a.finetune} epochs on the {a.finetune_data} data"] if a.finetune else [])
    save_model(fused, out, force=a.force, metadata={
        "dataset": ds.name, "method": a.method, "importance": a.importance, "seed": a.seed,
        "width": a.width, "options": {k: v for k, v in options.items() if k != "class_weights"},
        "head_weights": bool(a.head_weights), "repair": bool(a.repair), "finetune": a.finetune,
        "depth": a.depth, "inputs": [str(p) for p in a.checkpoints], "distributed": bool(distributed),
        "distill": a.distill, "distill_extra": a.distill_extra,
        "fusion_samples": int(fusion[0].shape[0])})
    s = evaluate(fused, ds.x_test, ds.y_test)
    extra = f" + {', '.join(steps)}" if steps else ""
    print(f"{out}: {label} of {len(models)} models{extra}, test accuracy {100 * s['accuracy']:.2f}%")
    return 0


# -- your own models: --model-factory and `neurofuse levels` ---------------------------------

def _add_factory_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-factory", default=None, metavar="FILE.py:FUNCTION",
                   help="fuse checkpoints of your own model: FUNCTION() builds it, the checkpoints "
                        "are its state dicts (.pt read with weights_only=True, or .safetensors; "
                        "names matched by shapes and order if they differ), the levels are found "
                        "automatically, --out gets the fused state dict in your model's names")
    p.add_argument("--auto-levels", action="store_true",
                   help="with --model-factory: find the levels automatically even if FUNCTION "
                        "returns a model with declared levels")


def _add_read_factory_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-factory", default=None, metavar="FILE.py:FUNCTION",
                   help="the checkpoints are state dicts of your own model (e.g. written by fuse "
                        "--model-factory): FUNCTION() builds it and the weights are loaded into it")


def _factory_models(a: argparse.Namespace, input_shape: Sequence[int]) -> List[Any]:
    """The checkpoints loaded into FUNCTION() models, with their levels (automatic or declared)."""
    from .errors import ConfigError
    from .interop import KeyMatchError, load_factory, load_state_dict
    from .levels import LeveledNet, auto_levels
    from torch import nn

    make = load_factory(a.model_factory)
    nets = []
    for path in a.checkpoints:
        model = make()
        if not isinstance(model, nn.Module):
            raise ConfigError(f"--model-factory {a.model_factory} returns a {type(model).__name__}, "
                              "not a torch.nn.Module")
        try:
            load_state_dict(model, path)
        except KeyMatchError as exc:
            print(exc.table, file=sys.stderr)
            raise
        if isinstance(model, LeveledNet) and not a.auto_levels:
            nets.append(model)
        else:
            nets.append(auto_levels(model, input_shape))
    return nets


def _fuse_factory(a: argparse.Namespace, out: Path) -> int:
    """``fuse --model-factory FILE.py:FUNCTION ckpt...``: fuse your own model's state dicts."""
    from .api import fuse
    from .checkpoint import save_factory_state
    from .data import load_dataset
    from .errors import ConfigError
    from .experiment import fusion_set
    from .levels import AutoNet, LeveledNet
    from .training import evaluate

    if not a.model_factory:
        raise ConfigError("--auto-levels needs --model-factory FILE.py:FUNCTION (zoo checkpoints "
                          "carry their levels)")
    if a.distributed or a.depth or a.head_weights:
        raise ConfigError("--model-factory does not combine with --distributed, --depth or "
                          "--head-weights; fuse without them")
    if not a.dataset:
        raise ConfigError("--model-factory checkpoints do not say which dataset they were trained "
                          "on; pass --dataset")
    if not out.name.endswith(".safetensors"):
        raise ConfigError(f"--out {out} must end in .safetensors")
    ds = load_dataset(a.dataset, a.data_dir)
    nets = _factory_models(a, tuple(ds.x_train.shape[1:]))
    fusion = fusion_set(ds, a.fusion_samples, seed=a.seed)
    finetune, finetune_data = _finetune_args(a, ds)
    fused = fuse(nets, fusion, method=a.method, importance=a.importance, width=a.width,
                 seed=a.seed, progress=not a.no_progress, device=a.device, repair=a.repair,
                 finetune=finetune, finetune_data=finetune_data, **_parse_options(a.option))
    if not isinstance(fused, LeveledNet):
        raise ConfigError(f"{a.method} does not give one model of your architecture "
                          f"({type(fused).__name__}); choose a method that does")
    ref = nets[0]
    state = ref.model_state_dict(fused) if isinstance(ref, AutoNet) else fused.state_dict()
    meta = {"model_factory": a.model_factory, "method": a.method, "importance": a.importance,
            "seed": a.seed, "dataset": ds.name, "inputs": [str(p) for p in a.checkpoints],
            "levels": "auto" if isinstance(ref, AutoNet) else "declared",
            "fusion_samples": int(fusion[0].shape[0])}
    save_factory_state(state, out, meta, force=a.force)
    s = evaluate(fused, ds.x_test, ds.y_test)
    how = f"{ref.num_levels} automatic levels" if isinstance(ref, AutoNet) else f"{ref.num_levels} levels"
    print(f"{out}: {a.method} of {len(nets)} {a.model_factory} models ({how}), "
          f"test accuracy {100 * s['accuracy']:.2f}%; read it with --model-factory {a.model_factory} "
          "(eval, finetune) or neurofuse.interop.load_state_dict(FUNCTION(), path)")
    return 0


def _shape_arg(text: str) -> List[int]:
    try:
        dims = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        dims = []
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"expected positive ints like 3,32,32, got {text!r}")
    return dims


def cmd_levels(a: argparse.Namespace) -> int:
    """``neurofuse levels FILE.py:FUNCTION``: the automatic levels and the methods for each."""
    from .data import load_dataset
    from .errors import ConfigError
    from .interop import load_factory, load_state_dict
    from .levels import LeveledNet, auto_levels
    from .methods import format_levels

    shape: Optional[tuple] = None
    if a.input_shape:
        shape = tuple(a.input_shape)
    elif a.dataset:
        shape = tuple(load_dataset(a.dataset, a.data_dir).x_train.shape[1:])
    model = load_factory(a.factory)()
    if a.checkpoint:
        load_state_dict(model, a.checkpoint)
    if isinstance(model, LeveledNet):           # the zoo, declared levels, a wrapped HF model
        own = tuple(model.input_shape)
        if shape is not None and shape != own:
            raise ConfigError(f"{a.factory} builds a model of input shape {list(own)}, not {list(shape)}; "
                              "drop --input-shape / --dataset or build the model for that shape")
        net, how, shape = model, "its own levels", own
    elif shape is None:
        raise ConfigError("give the shape of one input with --input-shape C,H,W (or --dataset)")
    elif getattr(getattr(model, "config", None), "model_type", None) is not None:
        from .hf import wrap                     # a transformers classifier: its family's adapter

        net = wrap(model, shape)
        how = f"the Hugging Face {net.family!r} adapter"
    else:
        net = auto_levels(model, shape)
        how = "torch.fx" if net.tracer == "fx" else "forward hooks"
    print(f"{a.factory}: {type(model).__name__}, input {list(shape)}, {net.num_levels} levels (found with {how})")
    print(format_levels(net))
    return 0


def _add_levels_parser(sub: Any) -> None:
    from .data import list_datasets

    p = sub.add_parser("levels", help="show the automatic levels of your model and which methods fuse them")
    p.add_argument("factory", metavar="FILE.py:FUNCTION", help="function that builds the model")
    p.add_argument("--input-shape", type=_shape_arg, default=None, help="shape of one input, e.g. 3,32,32")
    p.add_argument("--dataset", default=None, choices=list_datasets(), help="take the input shape from a dataset")
    p.add_argument("--data-dir", default=None, help="directory with the dataset files")
    p.add_argument("--checkpoint", default=None, help="load these weights first (state dict)")
    p.set_defaults(func=cmd_levels)


def _parse_options(items: Optional[Sequence[str]]) -> Dict[str, Any]:
    from .errors import ConfigError

    options: Dict[str, Any] = {}
    for kv in items or []:
        k, eq, v = kv.partition("=")
        if not eq or not k.strip():
            raise ConfigError(f"--option needs KEY=VALUE, e.g. --option n_init=20, got {kv!r}")
        try:
            options[k.strip().replace("-", "_")] = json.loads(v) if v else True
        except json.JSONDecodeError:
            options[k.strip().replace("-", "_")] = v  # a bare word, e.g. solver=sinkhorn
    for key, flag in _OWN_FLAGS.items():
        if key in options:
            raise ConfigError(f"--option {key}=... clashes with the command's own setting; use "
                              f"{flag} instead")
    return options


#: ``fuse`` settings that have their own flag and must not come in through ``--option``
_OWN_FLAGS = {"device": "--device", "seed": "--seed", "method": "--method",
              "importance": "--importance", "width": "--width", "progress": "--no-progress",
              "repair": "--repair", "finetune": "--finetune", "finetune_data": "--finetune-data",
              "depth": "--depth", "reference": "--reference", "distributed": "--distributed",
              "depth_metric": "--depth-metric", "balance": "--balance", "data": "--dataset",
              "models": "the checkpoint arguments"}


def _class_shares_for(checkpoints: Sequence[str]) -> Any:
    """The class shares of the models' training parts, from ``split.json`` beside the checkpoints."""
    from .checkpoint import read_config
    from .errors import ConfigError

    split = Path(checkpoints[0]).parent / "split.json"
    if not split.exists():
        raise ConfigError(f"--head-weights needs the class shares in {split} (written by "
                          "`neurofuse train`); it is missing")
    bad = ConfigError(f"{split} is not a split file written by `neurofuse train` (it needs "
                      "'class_shares': one list of class shares per model); re-create it")
    try:
        text = split.read_text(encoding="utf-8")
        if len(text) > 64 << 20:
            raise bad
        shares = json.loads(text)["class_shares"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError):
        raise bad from None
    if not (isinstance(shares, list) and shares and all(
            isinstance(r, list) and r and len(r) == len(shares[0]) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < float("inf")
                for v in r) for r in shares)):
        raise bad
    rows = []
    for p in checkpoints:
        idx = read_config(p).get("metadata", {}).get("model_index")
        if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < len(shares):
            raise ConfigError(f"{p} does not say which part of {split} it was trained on")
        rows.append(shares[idx])
    return rows


def _finetune_args(a: argparse.Namespace, ds: Any) -> Any:
    """``(FinetuneConfig or None, data or None)`` from the --finetune* flags."""
    if not getattr(a, "finetune", None):
        return None, None
    from .finetune import FinetuneConfig

    cfg = FinetuneConfig(epochs=a.finetune, lr=a.finetune_lr, seed=a.seed, device=a.device)
    data = (ds.x_train, ds.y_train) if a.finetune_data == "train" else None
    return cfg, data


def _distill_args(a: argparse.Namespace, ds: Any) -> Any:
    """``(DistillConfig or None, extra unlabelled inputs or None)`` from the --distill* flags."""
    if not getattr(a, "distill", None):
        return None, None
    import numpy as np

    from .distill import DistillConfig

    cfg = DistillConfig(epochs=a.distill, seed=a.seed, device=a.device, lr=a.distill_lr,
                        mixup=a.distill_mixup, flip=ds.name.startswith("cifar"))
    extra = None
    if a.distill_extra:
        rng = np.random.default_rng(a.seed + 1)
        k = min(a.distill_extra, len(ds.x_train))
        extra = ds.x_train[np.sort(rng.choice(len(ds.x_train), k, replace=False))]  # inputs only
    return cfg, extra


def _add_distill_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--distill", type=_pos_int, default=None, metavar="EPOCHS",
                   help="after fusion, train the fused model toward the models' ensemble (class-share "
                        "weighted with --head-weights) on the fusion set for up to EPOCHS epochs, "
                        "without labels (mixup, shifts, early stopping on a held-out part)")
    p.add_argument("--distill-extra", type=_nonneg_int, default=0, metavar="N",
                   help="with --distill: also distill on N random training images, labels unused (default: 0)")
    p.add_argument("--distill-lr", type=float, default=1e-4, metavar="LR",
                   help="with --distill: learning rate (default: 1e-4; 1e-3 with --distill-extra 20000, "
                        "docs/results.md)")
    p.add_argument("--distill-mixup", type=float, default=0.5, metavar="ALPHA",
                   help="with --distill: mixup strength between samples, 0 for none (default: 0.5; 0 "
                        "with --distill-extra 20000)")


def _add_finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--finetune", type=int, default=None, metavar="EPOCHS",
                   help="fine-tune after fusion for EPOCHS epochs (cosine warm restarts, best "
                        "validation checkpoint)")
    p.add_argument("--finetune-lr", type=float, default=1e-4, help="fine-tuning learning rate (default: 1e-4)")
    p.add_argument("--finetune-data", choices=["train", "fusion"], default="train",
                   help="fine-tune on the whole training split (default) or on the fusion set only")


def _add_hf_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hf", action="store_true",
                   help="the checkpoints are Hugging Face save_pretrained folders (ViT, ResNet, "
                        "BERT classifiers; needs neurofuse[hf]); --out is a folder that "
                        "from_pretrained loads")
    p.add_argument("--hf-data", default=None, metavar="FILE",
                   help="with --hf: fusion data as safetensors with x_train, y_train (and x_test, "
                        "y_test to report accuracy), e.g. token ids [N, T]; default: --dataset, "
                        "resized to the models' image size")


def cmd_finetune(a: argparse.Namespace) -> int:
    from .checkpoint import save_factory_state, save_model
    from .data import load_dataset
    from .finetune import FinetuneConfig, finetune
    from .training import evaluate

    out = Path(a.out)
    inputs = _checkpoint_inputs([a.checkpoint]) + ([Path(a.model_factory.rsplit(":", 1)[0])] if a.model_factory else [])
    _check_outputs([(out, ".safetensors")], a.force, inputs, data_dir=a.data_dir)
    model = _load_all([a.checkpoint], a.model_factory)[0]
    ds = load_dataset(_dataset_of([a.checkpoint], a.dataset), a.data_dir)
    cfg = FinetuneConfig(epochs=a.epochs, lr=a.lr, seed=a.seed, device=a.device)
    tuned, history = finetune(model, ds.x_train, ds.y_train, cfg, progress=not a.no_progress)
    meta = {"dataset": ds.name, "finetuned_from": a.checkpoint, "epochs": a.epochs}
    if a.model_factory:
        save_factory_state(tuned.state_dict(), out, {"model_factory": a.model_factory, **meta}, force=a.force)
    else:
        save_model(tuned, out, force=a.force, metadata=meta)
    before = evaluate(model, ds.x_test, ds.y_test)["accuracy"]
    after = evaluate(tuned, ds.x_test, ds.y_test)["accuracy"]
    print(f"{out}: test accuracy {100 * before:.2f}% -> {100 * after:.2f}% after {a.epochs} epochs "
          f"(checkpoint chosen on a validation split)")
    return 0


def cmd_align(a: argparse.Namespace) -> int:
    from .checkpoint import save_json
    from .data import load_dataset
    from .depth import align_models, alignment_report, plot_cost_matrix
    from .experiment import fusion_set
    from .training import _resolve_device

    from .errors import ConfigError

    if len(a.checkpoints) < 2:
        raise ConfigError(f"align compares the levels of two or more models; got "
                          f"{len(a.checkpoints)} checkpoint: pass the models to align")
    _check_outputs([(p, kind) for p, kind in ((a.plot, ".png"), (a.json, ".json")) if p], a.force,
                   _checkpoint_inputs(a.checkpoints), data_dir=a.data_dir)
    models = _load_all(a.checkpoints)
    ds = load_dataset(_dataset_of(a.checkpoints, a.dataset), a.data_dir)
    fusion = fusion_set(ds, a.fusion_samples, seed=a.seed)
    device = _resolve_device(a.device)  # the levels are compared where the models run
    models = [m.to(device) for m in models]
    _, info = align_models(models, fusion, reference=a.reference, metric=a.metric, balance=a.balance)
    print(alignment_report(info))
    if a.json:
        save_json(info.to_dict(), a.json, force=a.force)
    if a.plot:
        pair = info.pairs[0] if info.pairs else None
        if pair is not None:
            plot_cost_matrix(pair.cost, pair.alignment, a.plot,
                             title=f"1 - linear CKA, model {pair.model} vs reference {info.reference}"
                             if a.metric == "cka" else f"{a.metric} cost, model {pair.model}")
            print(f"wrote {a.plot}")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from .checkpoint import save_json
    from .data import load_dataset
    from .training import evaluate

    if a.json:
        _check_outputs([(a.json, ".json")], a.force, _checkpoint_inputs(a.checkpoints),
                       data_dir=a.data_dir)
    ds = load_dataset(_dataset_of(a.checkpoints, a.dataset), a.data_dir)
    rows = {}
    for p, m in zip(a.checkpoints, _load_all(a.checkpoints, a.model_factory)):
        rows[p] = evaluate(m, ds.x_test, ds.y_test, device=a.device)
    width = max(len(p) for p in rows)
    print(f"{'checkpoint'.ljust(width)}  {'acc %':>6}  {'loss':>7}  {'F1 %':>6}   ({ds.name} test set, n={len(ds.y_test)})")
    for p, s in rows.items():
        print(f"{p.ljust(width)}  {100 * s['accuracy']:6.2f}  {s['loss']:7.4f}  {100 * s['macro_f1']:6.2f}")
    if a.json:
        save_json(rows, a.json, force=a.force)
    return 0


def _bench_event(name: str, scale: str) -> Callable[[str, Dict[str, Any]], None]:
    tag = f"[{name}/{scale}]"

    def event(kind: str, info: Dict[str, Any]) -> None:
        if kind == "cell":
            what = info.get("label") or info.get("cell_id")
            if info.get("status") == "ok":
                res = (f"accuracy {100 * info['accuracy']:.2f}%, loss {info['loss']:.4f}, "
                       f"{info['seconds']:.1f} s")
            else:
                res = f"N/A ({info.get('reason', '')})"
            print(f"{tag} {'reused' if info.get('reused') else 'done'}: {what}: {res}", flush=True)
        elif kind == "train":
            print(f"{tag} training {info['split']} base models (seed {info['seed']}, {info['epochs']} epochs; "
                  f"cache {info['hash']})", flush=True)
        elif kind == "cache":
            print(f"{tag} base models of the {info['split']}-way split, seed {info['seed']}: reusing "
                  f"{info.get('path', info['hash'])} (sha256 verified)", flush=True)
        elif kind == "base":
            accs = ", ".join(f"{100 * a:.1f}" for a in info["accuracies"])
            print(f"{tag} base models, {info['split']}-way, seed {info['seed']}: test accuracy {accs} %",
                  flush=True)
        elif kind == "figure":
            print(f"{tag} wrote {info['path']}", flush=True)

    return event


def cmd_bench_list(a: argparse.Namespace) -> int:
    from .bench import SCALES, list_configs, load_config

    for name in list_configs():
        cfg = load_config(name, "cpu")
        print(f"{name:11s} {cfg.title}")
        for scale in SCALES:
            c = load_config(name, scale)
            n = len(c.seeds)
            print(f"    {scale:5s}  {c.dataset}{f' ({c.train_subsample} train)' if c.train_subsample else ''}, "
                  f"{c.arch} {c.size}, {c.partition}, splits {list(c.splits)}, {n} seed{'s' * (n > 1)}, "
                  f"{len(c.methods)} methods x {len(c.importances)} importances")
    return 0


def cmd_bench_run(a: argparse.Namespace) -> int:
    from .bench import default_out, load_config, run_benchmark

    cfg = load_config(a.name, a.scale)
    if a.threads is not None:
        import torch

        if a.threads < 1:
            from .errors import ConfigError

            raise ConfigError(f"--threads must be a positive integer, got {a.threads}")
        torch.set_num_threads(a.threads)
    if a.seeds is not None:
        cfg = cfg.with_seeds(a.seeds)
    out = Path(a.out) if a.out else default_out(cfg.name, cfg.scale)
    command = "neurofuse bench run " + " ".join(
        [a.name, "--scale", a.scale] + (["--seeds", str(a.seeds)] if a.seeds is not None else [])
        + (["--out", str(a.out)] if a.out else []) + (["--cache", str(a.cache)] if a.cache else [])
        + (["--device", a.device] if a.device else [])
        + (["--data-dir", a.data_dir] if a.data_dir else []))
    cache = Path(a.cache) if a.cache else out / "cache"
    # a run resumes in its folder (so its own files are replaced), never into the data directory
    _check_outputs([(out, "dir"), (cache, "dir"), (out / "results.json", ".json"), (out / "report.md", ".md"),
                    (out / "config.json", ".json")], True, data_dir=a.data_dir)
    print(f"[{cfg.name}/{cfg.scale}] output: {out}; base-model cache: {cache}", flush=True)
    doc = run_benchmark(cfg, out, device=a.device, data_dir=a.data_dir, progress=not a.no_progress,
                        on_event=_bench_event(cfg.name, cfg.scale), command=command, cache=cache)
    lr = doc["last_run"]
    print(f"[{cfg.name}/{cfg.scale}] {doc['n_done']}/{doc['n_expected']} cells "
          f"({lr['computed_cells']} computed, {lr['reused_cells']} reused, {lr['trained_base_models']} base "
          f"models trained) in {lr['seconds']:.0f} s; wrote {out / 'results.json'} and {out / 'report.md'}")
    return 0


def cmd_bench_report(a: argparse.Namespace) -> int:
    from .bench import write_outputs

    doc = write_outputs(Path(a.dir))
    print(f"{doc['n_done']}/{doc['n_expected']} cells; wrote {Path(a.dir) / 'results.json'} and "
          f"{Path(a.dir) / 'report.md'}")
    if doc["missing"]:
        print(f"missing {len(doc['missing'])} cells (rerun `neurofuse bench run` to compute them)")
    return 0


def cmd_federate(a: argparse.Namespace) -> int:
    """``neurofuse federate``: a Flower run (simulation or in-process), or the ``fl`` benchmark."""
    from .errors import ConfigError

    from .federated import ClientSetup, FederatedConfig, format_table, plot_rounds, run_federated

    logging.getLogger("flwr").setLevel(logging.INFO if a.verbose else logging.WARNING)
    if a.bench:
        from .federated._bench import run_fl_bench

        out = Path(a.out) if a.out else None
        run_fl_bench(a.bench, a.scale, out, backend=a.backend, data_dir=a.data_dir, force=a.force)
        return 0
    out = Path(a.out)
    _check_outputs([(out, "dir"), (out / "results.json", ".json"), (out / "accuracy.png", ".png")],
                   a.force, data_dir=a.data_dir)
    compare = [c for c in (a.compare.split(",") if a.compare else []) if c]
    if a.clients < 1:
        raise ConfigError(f"--clients must be >= 1, got {a.clients}")
    from .experiment import DEFAULT_EPOCHS

    epochs = a.epochs if a.epochs is not None else DEFAULT_EPOCHS.get(a.dataset, 10)
    setup = ClientSetup(dataset=a.dataset, num_clients=a.clients, partition=a.partition, alpha=a.alpha,
                        arch=a.arch, size=a.size, epochs=epochs, lr=a.lr, seed=a.seed, data_dir=a.data_dir)
    cfg = FederatedConfig(clients=setup, method=a.method, importance=a.importance, rounds=a.rounds,
                          no_server_data=a.no_server_data, server_samples=a.server_samples,
                          server_labels=not a.server_unlabelled,
                          class_shares=a.class_shares, init=a.init,
                          compare=tuple(compare), backend=a.backend, seed=a.seed)
    results = run_federated(cfg)
    results["command"] = "neurofuse " + " ".join(getattr(a, "argv", []))
    from .checkpoint import save_json

    out.mkdir(parents=True, exist_ok=True)
    save_json(results, out / "results.json", force=True)
    plot = plot_rounds(results, out / "accuracy.png",
                       title=f"{a.dataset}, {a.clients} clients, {a.partition}"
                             f"{f' alpha {a.alpha}' if a.partition == 'dirichlet' else ''}, {a.method}")
    print(format_table(results))
    print(f"wrote {out / 'results.json'} and {plot} ({results['seconds']:.0f} s)")
    return 0


# -- parser ---------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse with the same one-line error format as every other neurofuse error."""

    def error(self, message: str) -> "NoReturn":  # type: ignore[override]
        self.exit(2, f"neurofuse: error: {message} (see {self.prog} --help)\n")


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _pos_int(text: str) -> int:
    value = _nonneg_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--no-progress`` for commands without ``--force`` of the common kind."""
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_verbose_everywhere(sub: argparse._SubParsersAction) -> None:
    """Accept ``-v`` after the subcommand too (``neurofuse fuse ... -v``), on every subcommand.

    The subcommand's count is stored only when given (``SUPPRESS``), so ``neurofuse -v fuse``
    keeps the count given before the subcommand.
    """
    for p in sub.choices.values():
        if not any("--verbose" in a.option_strings for a in p._actions):
            p.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                           help="more log output (repeat for debug)")
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                _add_verbose_everywhere(action)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="neurofuse", description=(
        "Fuse independently trained neural networks into one, zero-shot (neuron interpolation "
        "fusion and the field's baselines)."))
    parser.add_argument("--version", action="version", version=f"neurofuse {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--force", action="store_true", help="overwrite existing outputs")
        p.add_argument("--no-progress", action="store_true", help="hide progress bars")
        p.add_argument("--device", default="cpu", help="torch device (default: cpu)")

    p = sub.add_parser("demo", help="train base models, fuse with every method, print a table")
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    _add_data_args(p)
    _add_split_args(p)
    p.add_argument("--fusion-samples", type=_pos_int, default=400, help="size of the fusion set (default: 400)")
    p.add_argument("--methods", default=None, help="comma-separated methods (default: all registered)")
    p.add_argument("--finetune", type=int, default=None, metavar="EPOCHS",
                   help="also fine-tune every fused model for EPOCHS epochs on the training split "
                        "(rows '<method>+ft')")
    common(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train base models on a partition of a dataset")
    p.add_argument("--out", required=True, help="directory for model_<i>.safetensors and split.json")
    _add_data_args(p)
    _add_split_args(p)
    common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("fuse", help="fuse checkpoints into one checkpoint")
    p.add_argument("checkpoints", nargs="+", help="base model checkpoints (.safetensors)")
    p.add_argument("--out", required=True, help="fused checkpoint (.safetensors)")
    p.add_argument("--method", default="kf-linear",
                   help="fusion method (default: %(default)s; see `neurofuse methods`)")
    p.add_argument("--importance", default="uniform",
                   help="neuron importance: uniform, conductance or deeplift (default: %(default)s)")
    p.add_argument("--width", type=_width, default=None,
                   help="fused width: an int, a multiplier like 0.5, or a list like 32,64 (default: "
                        "the first model's widths)")
    p.add_argument("--fusion-samples", type=_pos_int, default=400, help="size of the fusion set (default: 400)")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="seed of the fusion set and of fusion (default: 0)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="method option, e.g. --option n_init=20 --option solver=sinkhorn (repeatable; "
                        "`neurofuse methods NAME` lists a method's keys, types and defaults)")
    p.add_argument("--head-weights", action="store_true",
                   help="weigh each model's logits per class by its share of the class's training "
                        "samples (the paper's head weights; reads split.json beside the checkpoints)")
    p.add_argument("--repair", action="store_true",
                   help="REPAIR after fusion: re-estimate BatchNorm statistics and rescale neurons")
    _add_distill_args(p)
    _add_finetune_args(p)
    p.add_argument("--depth", choices=["align"], default=None,
                   help="fuse models of different depths (cross-layer alignment, CLAFusion)")
    p.add_argument("--reference", type=int, default=None,
                   help="with --depth align: index of the model whose depth the fused model takes")
    p.add_argument("--balance", choices=["add", "merge"], default="add",
                   help="with --depth align: insert identity levels (add, default) or merge levels (merge)")
    p.add_argument("--depth-metric", choices=["cka", "euclidean"], default="cka",
                   help="with --depth align: level dissimilarity (default: cka)")
    p.add_argument("--distributed", action="store_true",
                   help="under torchrun: each rank streams a shard of the fusion set, the level "
                        "statistics are all-reduced (gloo on CPU, nccl on GPU), rank 0 writes --out; "
                        "e.g. torchrun --nproc-per-node 2 -m neurofuse fuse ... --distributed")
    _add_data_args(p, default_dataset=None)
    _add_factory_args(p)
    _add_hf_args(p)
    common(p)
    p.set_defaults(func=cmd_fuse)
    _add_levels_parser(sub)

    p = sub.add_parser("finetune", help="fine-tune a (fused) checkpoint on the training split")
    p.add_argument("checkpoint", help="checkpoint to fine-tune (never overwritten)")
    p.add_argument("--out", required=True, help="fine-tuned checkpoint (.safetensors)")
    p.add_argument("--epochs", type=_pos_int, default=30, help="fine-tuning epochs (default: 30)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default: 1e-4)")
    p.add_argument("--seed", type=_nonneg_int, default=0,
                   help="seed of the validation hold-out, the data order and dropout (default: 0)")
    _add_read_factory_arg(p)
    _add_data_args(p, default_dataset=None)
    common(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("align", help="align the levels of models of different depths (CLAFusion)")
    p.add_argument("checkpoints", nargs="+", help="checkpoints of models of different depths")
    p.add_argument("--reference", type=int, default=None, help="index of the reference model")
    p.add_argument("--balance", choices=["add", "merge"], default="add",
                   help="insert identity levels into shallower models (add, default) or merge levels "
                        "of deeper ones (merge)")
    p.add_argument("--metric", choices=["cka", "euclidean"], default="cka",
                   help="level dissimilarity (default: cka)")
    p.add_argument("--fusion-samples", type=_pos_int, default=400, help="samples compared (default: 400)")
    p.add_argument("--seed", type=_nonneg_int, default=0,
                   help="seed of the sample of training images compared (default: 0)")
    p.add_argument("--plot", default=None, help="save the cost matrix and alignment as a heat map (PNG)")
    p.add_argument("--json", default=None, help="save the alignment and cost matrices as JSON")
    p.add_argument("--force", action="store_true", help="overwrite --plot/--json outputs")
    _add_run_args(p)
    _add_data_args(p, default_dataset=None)
    p.set_defaults(func=cmd_align)

    p = sub.add_parser("eval", help="accuracy, loss and macro-F1 of checkpoints on the test set")
    p.add_argument("checkpoints", nargs="+", help="checkpoints to score")
    p.add_argument("--json", default=None, help="also write the scores to this JSON file")
    _add_read_factory_arg(p)
    _add_data_args(p, default_dataset=None)
    p.add_argument("--force", action="store_true", help="overwrite --json if it exists")
    _add_run_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("federate", help="federated fusion with Flower: clients train, the server fuses")
    p.add_argument("--clients", type=_pos_int, default=5, help="number of clients (default: 5)")
    p.add_argument("--partition", default="dirichlet", choices=["dirichlet", "sharded", "iid"],
                   help="client data split (default: dirichlet: Dirichlet(alpha) class shares)")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (default: 0.5)")
    p.add_argument("--method", default="kf-linear", help="aggregation: a fusion method, vanilla = FedAvg (default: %(default)s)")
    p.add_argument("--importance", default="uniform", help="importance score of the method (default: %(default)s)")
    p.add_argument("--rounds", type=_pos_int, default=1, help="federated rounds (default: 1, one-shot)")
    p.add_argument("--no-server-data", action="store_true",
                   help="fuse from the clients' statistics: the server holds no sample")
    p.add_argument("--init", default="shared", choices=["shared", "different"],
                   help="shared: every client starts from one initial model (the FL standard); "
                        "different: each from its own random initialisation (default: %(default)s)")
    p.add_argument("--server-samples", type=_nonneg_int, default=400,
                   help="size of the server's fusion set (default: 400)")
    p.add_argument("--server-unlabelled", action="store_true", help="the server's fusion set has no labels")
    p.add_argument("--class-shares", action=argparse.BooleanOptionalAction, default=True,
                   help="weigh the output level by the clients' class shares, from the label counts "
                        "each client sends (default: on; --no-class-shares for the plain method)")
    p.add_argument("--compare", default=None,
                   help="more fusion methods scored beside the method on the same client models, "
                        "comma-separated (e.g. feddf,otfusion); FedAvg and the ensemble are always scored")
    p.add_argument("--backend", default="simulation", choices=["simulation", "local"],
                   help="simulation: Flower's Ray simulation; local: the same apps in this process "
                        "(fast start, small machines; default: %(default)s)")
    p.add_argument("--arch", default="mlp", help="client architecture (default: mlp)")
    p.add_argument("--size", default="small", choices=["tiny", "small", "paper"],
                   help="named model size (default: %(default)s)")
    p.add_argument("--epochs", type=_pos_int, default=None,
                   help="local epochs per round (default: per dataset, digits 60, mnist 8)")
    p.add_argument("--lr", type=float, default=1e-3, help="local learning rate (default: %(default)s)")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="seed of the split, training and fusion")
    p.add_argument("--bench", default=None, help="run a federated benchmark config instead (e.g. fl)")
    p.add_argument("--scale", default="full", help="benchmark scale: smoke or full (default: %(default)s)")
    p.add_argument("--out", default="runs/federate", help="output directory (default: runs/federate)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    _add_data_args(p)
    p.set_defaults(func=cmd_federate)

    p = sub.add_parser("methods", help="list the fusion methods, or one method's options")
    p.add_argument("name", nargs="?", default=None,
                   help="a method: show its --option keys with their types and defaults")
    p.add_argument("--hf", action="store_true",
                   help="which methods fuse which Hugging Face model family, and why not")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("bench", help="reproduce the paper's tables: list, run, report")
    bsub = p.add_subparsers(dest="bench_command", metavar="BENCH_COMMAND", required=True)
    q = bsub.add_parser("list", help="list the benchmarks and their scales")
    q.set_defaults(func=cmd_bench_list)
    q = bsub.add_parser("run", help="run (or resume) a benchmark")
    q.add_argument("name", help="benchmark name (see `neurofuse bench list`) or a config .json")
    q.add_argument("--scale", required=True, choices=["smoke", "cpu", "full"],
                   help="smoke: seconds on digits; cpu: minutes on MNIST; full: the paper's budgets (GPU)")
    q.add_argument("--seeds", type=int, default=None, help="number of seeds (default: the config's)")
    q.add_argument("--out", default=None, help="output directory (default: runs/bench/<name>-<scale>)")
    q.add_argument("--cache", default=None, metavar="DIR",
                   help="directory of cached base models, verified by sha256 before reuse (default: "
                        "<out>/cache; pass one DIR to several runs to share their base models)")
    q.add_argument("--device", default=None, help="torch device, e.g. cuda (default: the config's, cpu)")
    q.add_argument("--data-dir", default=None,
                   help="directory with the dataset files (default: $NEUROFUSE_DATA, then ../shared/data)")
    q.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 is much faster on a CPU shared with other jobs)")
    q.add_argument("--no-progress", action="store_true", help="hide progress bars")
    q.set_defaults(func=cmd_bench_run)
    q = bsub.add_parser("report", help="rewrite results.json and report.md of a run directory")
    q.add_argument("dir", help="output directory of `neurofuse bench run`")
    q.set_defaults(func=cmd_bench_report)
    _add_verbose_everywhere(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    level = logging.WARNING - 10 * args.verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(levelname)s %(name)s: %(message)s")
    from .errors import NeurofuseError

    try:
        _check_args(args)
        return int(args.func(args) or 0)
    except NeurofuseError as exc:
        msg = " ".join(str(exc).split())
        print(f"neurofuse: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("neurofuse: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:   # `neurofuse methods | head`: the reader left; say nothing, as cat does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())   # no second error when Python flushes stdout
        return 141
    except (OSError, RecursionError, OverflowError, MemoryError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and not isinstance(exc, RecursionError) \
                and not _is_out_of_memory(exc):
            raise
        log.debug("error", exc_info=True)
        msg = " ".join(_error_line(exc).split())
        print(f"neurofuse: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
