"""Benchmarks (``neurofuse bench``): configs, the smoke run of table 1, resume, cache, report."""

from __future__ import annotations

import ast
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from neurofuse.bench import (SCALES, STATS, config_dir, expected_cells, fmt_mean_std, format_cell,
                             list_configs, load_config, parse_config)
from neurofuse.bench._report import format_base
from neurofuse.cli import main
from neurofuse.errors import ConfigError

TABLES = ["importance", "pareto", "runtime", "table1", "table2", "table3"]


def _doc(name: str = "table1") -> dict:
    return json.loads((config_dir() / f"{name}.json").read_text())


def _bench(*args: str) -> int:
    """``neurofuse bench ...`` with one torch thread (the thread count is part of the cache key,
    and one thread is much faster on a CI machine shared with other jobs)."""
    threads = torch.get_num_threads()
    try:
        return main(["bench", *args, "--threads", "1"])
    finally:
        torch.set_num_threads(threads)


# -- configs ----------------------------------------------------------------------------------
def test_every_table_is_shipped():
    assert set(TABLES) <= set(list_configs())


@pytest.mark.parametrize("name", TABLES)
@pytest.mark.parametrize("scale", SCALES)
def test_configs_load_and_validate(name, scale):
    cfg = load_config(name, scale)
    assert cfg.name == name and cfg.scale == scale
    assert expected_cells(cfg)
    for split in cfg.splits:
        assert cfg.epochs_for(split) >= 1
    if scale == "smoke":
        assert cfg.dataset == "digits"
    if scale == "cpu":
        assert cfg.dataset == "mnist"


def test_full_scale_follows_the_paper():
    t1 = load_config("table1", "full")
    assert (t1.dataset, t1.arch, t1.size, t1.splits, len(t1.seeds)) == ("cifar10", "vgg", "paper", (2, 4, 8), 5)
    assert t1.fusion_samples == 400 and t1.epochs_for(2) == 200 and t1.epochs_for(8) == 125
    t2 = load_config("table2", "full")
    assert (t2.dataset, t2.arch, t2.partition, t2.splits) == ("cifar100", "vit", "sharded", (2, 4, 6))
    t3 = load_config("table3", "full")
    assert t3.partition == "full" and t3.finetune is not None and t3.finetune.settings["epochs"] == 200


@pytest.mark.parametrize("where, change, needle", [
    ("top", {"colour": 1}, "unknown key(s) ['colour']"),
    ("common", {"fusion_sample": 400}, "unknown key(s) ['fusion_sample']"),
    ("smoke", {"splits": [0]}, "splits[0]"),
    ("smoke", {"methods": ["kf-linaer"]}, "unknown value 'kf-linaer'"),
    ("smoke", {"train": {"epochs": 3, "momentum": 0.9}}, "train: unknown key(s) ['momentum']"),
    ("smoke", {"method_options": {"kf-linear": {"n_inits": 3}}}, "unknown key(s) ['n_inits']"),
    ("smoke", {"importances": ["shap"]}, "unknown value 'shap'"),
])
def test_bad_config_is_a_one_line_config_error(where, change, needle):
    doc = _doc()
    if where == "top":
        doc.update(change)
    elif where == "common":
        doc["common"].update(change)
    else:
        doc["scales"][where].update(change)
    with pytest.raises(ConfigError) as exc:
        parse_config(doc, "smoke", source="bad.json")
    msg = str(exc.value)
    assert needle in msg and "\n" not in msg and msg.startswith("bad.json")


def test_unknown_scale_and_name():
    with pytest.raises(ConfigError, match="unknown scale"):
        load_config("table1", "huge")
    with pytest.raises(ConfigError, match="unknown benchmark"):
        load_config("table99", "smoke")


def test_cli_bad_config_file(tmp_path, capsys):
    doc = _doc()
    doc["scales"]["smoke"]["epochz"] = 3
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(doc))
    assert main(["bench", "run", str(p), "--scale", "smoke", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("neurofuse: error:") and "epochz" in err and "\n" not in err


def test_unregistered_architecture_fails_in_one_line(tmp_path, capsys):
    doc = _doc()
    doc["scales"]["smoke"]["arch"] = "resnet-xl"
    p = tmp_path / "arch.json"
    p.write_text(json.dumps(doc))
    assert main(["bench", "run", str(p), "--scale", "smoke", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs architecture 'resnet-xl'" in err and "\n" not in err
    assert not list((tmp_path / "o").glob("cells/*.json"))


def test_bench_list(capsys):
    assert main(["bench", "list"]) == 0
    out = capsys.readouterr().out
    for name in TABLES:
        assert name in out
    assert "smoke" in out and "cpu" in out and "full" in out


# -- report formatting -------------------------------------------------------------------------
def test_mean_std_formatting():
    assert fmt_mean_std([0.845, 0.857]) == "85.1 ± 0.8"
    assert fmt_mean_std([0.8456]) == "84.6"
    assert fmt_mean_std([]) == "–"
    assert fmt_mean_std([1.25, 2.75], scale=1.0, digits=2) == "2.00 ± 1.06"


def test_cell_formatting_na_and_missing():
    ok = [{"status": "ok", "accuracy": 0.5}, {"status": "ok", "accuracy": 0.7}]
    assert format_cell(ok) == "60.0 ± 14.1"
    assert format_cell([{"status": "n/a", "reason": "2 models only"}] * 3) == "N/A"
    assert format_cell([]) == "–"
    assert format_base([{"accuracies": [0.9, 0.8]}, {"accuracies": [0.7, 0.6]}]) == "80.0 / 70.0"
    assert format_base([{"accuracies": [0.9, 0.8, 0.7, 0.6, 0.5]}]) == "70.0 (range 50.0–90.0)"


# -- the smoke run of table 1 ------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "table1-smoke"
    before = dict(STATS)
    assert _bench("run", "table1", "--scale", "smoke", "--out", str(out), "--no-progress") == 0
    return out, {k: STATS[k] - before[k] for k in STATS}


@pytest.mark.slow
def test_smoke_table1_writes_everything(smoke_run):
    out, stats = smoke_run
    doc = json.loads((out / "results.json").read_text())
    cfg = load_config("table1", "smoke")
    assert doc["n_done"] == doc["n_expected"] == len(expected_cells(cfg)) and not doc["missing"]
    assert stats["trained_base_models"] == sum(cfg.splits) * len(cfg.seeds)
    for c in doc["cells"]:
        assert {"method", "importance", "split", "seed", "accuracy", "loss", "seconds", "status"} <= set(c) \
            or c["status"] == "n/a"
    assert len(doc["base_models"]) == len(cfg.splits) * len(cfg.seeds)
    assert doc["ensemble"] and all(c["method"] == "ensemble" for c in doc["ensemble"])
    ok = [c for c in doc["cells"] if c["status"] == "ok"]
    assert all(0 <= c["accuracy"] <= 1 and c["seconds"] >= 0 for c in ok)
    # HF Linear and Git Re-Basin take two models only
    na = {(c["method"], c["split"]) for c in doc["cells"] if c["status"] == "n/a"}
    assert ("hf-linear", 4) in na and ("git-rebasin", 4) in na and ("hf-linear", 2) not in na
    report = (out / "report.md").read_text()
    for row in ["Base models", "Best base model", "Vanilla Averaging", "Last-layer KD", "Ensemble", "OTFusion", "Git Re-Basin",
                "HF Linear (uniform)", "KF Linear (conductance)", "KF Gradient (uniform)"]:
        assert f"| {row} |" in report
    assert "| Method | 2-way split | 4-way split |" in report
    assert "N/A" in report and " ± " in report
    for png in ["accuracy_bars.png", "clustering.png", "landscape.png"]:
        assert (out / png).stat().st_size > 10_000
        assert png in report


@pytest.mark.slow
def test_results_record_the_software_versions_threads_and_cache(smoke_run):
    out, _ = smoke_run
    doc = json.loads((out / "results.json").read_text())
    sw = doc["machine"]["software"]
    for name in ("python", "torch", "numpy", "scipy", "POT", "captum", "neurofuse", "platform"):
        assert sw.get(name), name
    assert sw["torch_threads"] == 1
    assert doc["cache"] == str(out / "cache")
    assert "- Software: python " in (out / "report.md").read_text()


@pytest.mark.slow
def test_resume_recomputes_only_the_missing_cell_and_trains_nothing(smoke_run, tmp_path, capsys):
    src, _ = smoke_run
    out = tmp_path / "resumed"
    shutil.copytree(src, out)
    cells = out / "cells"
    victim = cells / "kf-linear__conductance__n2__s1.json"
    victim.unlink()
    # a partial file left by a killed writer: never read as a result
    partial = cells / f".{victim.name}.0123abcd.tmp"
    partial.write_text('{"cell_id": "kf-linear__conductance__n2__s1", "status": "o')
    # a truncated cell file is not complete either
    (cells / "vanilla__uniform__n4__s0.json").write_text('{"cell_id": "vanilla__uniform__n4__s0", "st')
    before = dict(STATS)
    assert _bench("run", "table1", "--scale", "smoke", "--out", str(out), "--no-progress") == 0
    stats = {k: STATS[k] - before[k] for k in STATS}
    assert stats["computed_cells"] == 2
    assert stats["trained_base_models"] == 0  # cache hit: no base model is trained again
    assert stats["cache_hits"] == 2
    assert victim.is_file() and json.loads(victim.read_text())["status"] == "ok"
    log = capsys.readouterr().out
    assert "done: kf-linear/conductance, 2-way, seed 1" in log
    assert "done: vanilla, 4-way, seed 0" in log
    assert "training" not in log
    doc = json.loads((out / "results.json").read_text())
    assert doc["n_done"] == doc["n_expected"] and doc["last_run"]["computed_cells"] == 2


@pytest.mark.slow
def test_rerun_reuses_everything_and_report_rebuilds(smoke_run, tmp_path, capsys):
    src, _ = smoke_run
    out = tmp_path / "again"
    shutil.copytree(src, out)
    before = dict(STATS)
    assert _bench("run", "table1", "--scale", "smoke", "--out", str(out), "--no-progress") == 0
    stats = {k: STATS[k] - before[k] for k in STATS}
    assert stats["computed_cells"] == 0 and stats["trained_base_models"] == 0 and stats["cache_hits"] == 0
    (out / "report.md").unlink()
    assert main(["bench", "report", str(out)]) == 0
    assert "| Vanilla Averaging |" in (out / "report.md").read_text()


@pytest.mark.slow
def test_base_models_are_shared_across_tables(smoke_run, tmp_path):
    src, _ = smoke_run
    parent = tmp_path / "bench"
    shutil.copytree(src, parent / "table1-smoke")
    before = dict(STATS)
    assert _bench("run", "runtime", "--scale", "smoke", "--out", str(parent / "runtime-smoke"),
                  "--cache", str(parent / "table1-smoke" / "cache"), "--no-progress") == 0
    stats = {k: STATS[k] - before[k] for k in STATS}
    assert stats["trained_base_models"] == 0 and stats["cache_hits"] == 1
    report = (parent / "runtime-smoke" / "report.md").read_text()
    assert "Runtime against fusion-set size" in report and "| 100 |" in report


def test_report_of_a_non_run_directory(tmp_path, capsys):
    assert main(["bench", "report", str(tmp_path)]) == 2
    assert "not a benchmark output directory" in capsys.readouterr().err


def test_with_seeds_takes_the_first_then_extends():
    cfg = load_config("table1", "smoke")
    assert cfg.seeds == (0, 1)
    assert cfg.with_seeds(1).seeds == (0,)
    assert cfg.with_seeds(3).seeds == (0, 1, 2)
    with pytest.raises(ConfigError):
        cfg.with_seeds(0)
    assert len(expected_cells(cfg.with_seeds(3))) == 3 * len(expected_cells(cfg.with_seeds(1)))


@pytest.mark.slow
def test_a_sibling_folders_cache_is_not_reused(smoke_run, tmp_path, monkeypatch):
    import neurofuse.experiment as experiment
    from neurofuse.bench import run_benchmark

    src, _ = smoke_run
    parent = tmp_path / "bench"
    shutil.copytree(src, parent / "table1-smoke")

    class WouldTrain(Exception):
        pass

    def refuse(*args, **kwargs):
        raise WouldTrain

    monkeypatch.setattr(experiment, "train_models_on_parts", refuse)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(WouldTrain):  # the sibling's cache has the right entry: it must not be used
            run_benchmark(load_config("runtime", "smoke"), parent / "runtime-smoke", progress=False)
    finally:
        torch.set_num_threads(threads)
    assert not (parent / "runtime-smoke" / "cache").exists() or \
        not list((parent / "runtime-smoke" / "cache").glob("*/meta.json"))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["bit-flip", "truncation"])
def test_a_corrupt_cached_base_model_is_retrained_with_a_warning(smoke_run, tmp_path, caplog, damage):
    from neurofuse.bench._runner import file_sha256

    src, _ = smoke_run
    out = tmp_path / "corrupt"
    shutil.copytree(src, out)
    meta = sorted((out / "cache").glob("*/meta.json"))[0]
    doc = json.loads(meta.read_text())
    split, seed = doc["key"]["n_models"], doc["key"]["seed"]
    model = meta.parent / "model_0.safetensors"
    data = bytearray(model.read_bytes())
    if damage == "bit-flip":
        data[-3] ^= 0x40  # in the tensor data: the file still loads, only the hash can tell
    else:
        data = data[: len(data) // 2]
    model.write_bytes(bytes(data))
    (out / "cells" / f"vanilla__uniform__n{split}__s{seed}.json").unlink()  # needs the base models
    before = dict(STATS)
    with caplog.at_level(logging.WARNING, logger="neurofuse"):
        assert _bench("run", "table1", "--scale", "smoke", "--out", str(out), "--no-progress") == 0
    stats = {k: STATS[k] - before[k] for k in STATS}
    assert stats["trained_base_models"] == split and stats["computed_cells"] == 1
    assert "unusable" in caplog.text and "sha256" in caplog.text and str(meta.parent) in caplog.text
    rewritten = json.loads(meta.read_text())["sha256"]
    # retrained with the same seeds and one thread: the very same bytes as before the damage
    assert rewritten == doc["sha256"] and file_sha256(model) == doc["sha256"]["model_0.safetensors"]


def test_the_cache_key_includes_the_torch_thread_count():
    from neurofuse.bench._runner import _hash, base_key

    cfg = load_config("table1", "smoke")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _hash(base_key(cfg, 2, 0))
        torch.set_num_threads(2)
        two = _hash(base_key(cfg, 2, 0))
    finally:
        torch.set_num_threads(threads)
    assert one != two


def test_bench_modules_import_no_cycle():
    import neurofuse.bench as bench

    folder = Path(bench.__file__).parent
    graph = {}
    for p in folder.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):  # function-level imports too
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                deps.add(node.module)
        graph[p.stem] = deps

    def reaches(start, goal, seen=()):
        return any(d == goal or (d not in seen and reaches(d, goal, (*seen, d)))
                   for d in graph.get(start, ()))

    cycles = [m for m in graph if m != "__init__" and reaches(m, m)]
    assert not cycles, f"import cycle through {cycles}: {graph}"


@pytest.mark.slow
@pytest.mark.parametrize("plant", ["other-entry", "train-output", "swapped-after-use"])
def test_a_planted_cache_entry_is_not_reused(smoke_run, tmp_path, caplog, plant):
    """Files put into a shared --cache that are not the entry's base models are refused even with a
    consistent meta.json (right hash, right sha256s): the entry is keyed by its content."""
    from neurofuse.bench._runner import content_hash, file_sha256

    src, _ = smoke_run
    out = tmp_path / "planted"
    shutil.copytree(src, out)
    metas = sorted((out / "cache").glob("*/meta.json"))
    docs = [json.loads(m.read_text()) for m in metas]
    victim_i = next(i for i, d in enumerate(docs) if d["key"]["n_models"] == 2)
    victim, doc = metas[victim_i].parent, docs[victim_i]
    donor = next(m.parent for m, d in zip(metas, docs) if d["key"]["n_models"] == 2 and m.parent != victim) \
        if plant == "other-entry" else None
    split, seed = doc["key"]["n_models"], doc["key"]["seed"]
    if plant == "train-output":
        assert main(["train", "--out", str(tmp_path / "t"), "--models", "2", "--size", "tiny", "--epochs", "1",
                     "--seed", "7", "--no-progress"]) == 0
        donor = tmp_path / "t"
    if plant == "swapped-after-use":   # the entry was used by this output, then replaced by an
        donor = victim                 # entry whose own metadata is right but whose content differs
        base = out / "cells" / f"base__n{split}__s{seed}.json"
        bdoc = json.loads(base.read_text())
        bdoc["content"] = "0" * 64
        base.write_text(json.dumps(bdoc))
    for i in range(split):
        if donor != victim:
            shutil.copyfile(donor / f"model_{i}.safetensors", victim / f"model_{i}.safetensors")
    digests = {f"model_{i}.safetensors": file_sha256(victim / f"model_{i}.safetensors") for i in range(split)}
    doc.update(sha256=digests, content=content_hash(digests))   # a consistent, forged meta.json
    metas[victim_i].write_text(json.dumps(doc))
    (out / "cells" / f"vanilla__uniform__n{split}__s{seed}.json").unlink()  # needs the base models
    before = dict(STATS)
    with caplog.at_level(logging.WARNING, logger="neurofuse"):
        assert _bench("run", "table1", "--scale", "smoke", "--out", str(out), "--no-progress") == 0
    stats = {k: STATS[k] - before[k] for k in STATS}
    assert stats["trained_base_models"] == split, caplog.text
    assert "unusable" in caplog.text and str(victim) in caplog.text
