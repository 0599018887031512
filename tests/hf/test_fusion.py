"""Fusing trained Hugging Face classifiers (Dirichlet splits): kf-gradient beats vanilla averaging
by at least 20 points and the mean base model, for 2 and 4 models of every family; the other
methods run on every family.  The full-size measurement is benchmarks/hf_fusion.py."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("transformers")

import neurofuse  # noqa: E402
import neurofuse.hf as nh  # noqa: E402
from neurofuse.training import evaluate  # noqa: E402

from .conftest import train_split  # noqa: E402

#: short kf-gradient budget for CI (the default preset allows 50 / 100 epochs per level)
FAST = {"levels": {"epochs": 20}, "head": {"epochs": 30}}


@pytest.fixture(scope="module", params=["vit", "resnet", "bert", "gpt2"])
def trained(request):
    return (request.param, *train_split(request.param, 4))


def acc(model, ds) -> float:
    return evaluate(model, ds.x_test, ds.y_test)["accuracy"]


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 4])
def test_kf_gradient_beats_vanilla_by_20_points_and_the_mean_base_model(trained, n):
    family, ds, models, fusion = trained
    models = models[:n]
    base = float(np.mean([acc(m, ds) for m in models]))
    vanilla = acc(neurofuse.fuse(models, fusion, method="vanilla", progress=False), ds)
    fused = neurofuse.fuse(models, fusion, method="kf-gradient", progress=False, **FAST)
    kf = acc(fused, ds)
    assert isinstance(fused, nh.HFLeveledNet) and fused.family == family
    assert kf >= vanilla + 0.20, (family, n, kf, vanilla)
    assert kf > base, (family, n, kf, base)


@pytest.mark.slow
def test_ensemble_kd_head_and_finetuning_fuse_every_family(trained, tmp_path):
    family, ds, models, fusion = trained
    models = models[:2]
    ens = neurofuse.fuse(models, fusion, method="ensemble", progress=False)
    kd = neurofuse.fuse(models, fusion, method="kd-head", progress=False, epochs=30)
    # kd-head retrains only model 0's head level: every other level is model 0's
    for i in range(models[0].num_levels - 1):
        for p, q in zip(kd.levels[i].parameters(), models[0].levels[i].parameters()):
            assert p.data.equal(q.data)
    result = neurofuse.fuse(models, fusion, method="vanilla", progress=False, finetune=3,
                            finetune_data=(ds.x_train, ds.y_train), return_result=True)
    tuned = result.model
    assert isinstance(tuned, nh.HFLeveledNet)
    assert acc(ens, ds) > 0.2 and acc(kd, ds) > 0.2
    # fine-tuning keeps its best validation epoch, the fused model (epoch 0) included
    hist = result.step("finetune").info["history"]
    assert hist["best_val_accuracy"] >= hist["val_accuracy"][0]
    nh.save_pretrained(tuned, tmp_path / "tuned")
    assert (tmp_path / "tuned" / "config.json").is_file()
