"""End to end: models of different depths, trained on different data, align, balance and fuse."""

import numpy as np
import pytest
import torch

import neurofuse
from neurofuse.data import partition
from neurofuse.depth import align_models
from neurofuse.models import MLP, VGG
from neurofuse.training import TrainConfig, evaluate, train_model

SHALLOW_VGG = [8, "M", 16, "M", 32, 32, "M", 32, 32]            # 6 conv levels
DEEP_VGG = [8, "M", 16, "M", 32, 32, "M", 32, 32, 32, 32]       # 8 conv levels


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models train fastest on one thread (and do not fight other processes for cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def parts(digits):
    """A 2-way Dirichlet split: each model sees different data with different class shares."""
    return partition(digits.y_train.numpy(), 2, "dirichlet", seed=0, ratio=0.5)


def _train(model, digits, part, seed, epochs):
    part = np.random.default_rng(seed).permutation(part)
    n_val = max(1, len(part) // 10)
    val, tr = part[:n_val], part[n_val:]
    torch.manual_seed(seed)
    train_model(model, digits.x_train[tr], digits.y_train[tr], digits.x_train[val],
                digits.y_train[val], config=TrainConfig(epochs=epochs, lr=3e-3, batch_size=32, seed=seed))
    return model.eval()


def _acc(model, digits):
    return evaluate(model, digits.x_test, digits.y_test)["accuracy"]


@pytest.fixture(scope="module")
def mlps(digits, parts):
    torch.manual_seed(1)
    shallow = _train(MLP(digits.input_shape, 10, [32, 32]), digits, parts[0], 0, 30)      # 3 levels
    torch.manual_seed(2)
    deep = _train(MLP(digits.input_shape, 10, [32, 32, 32, 32]), digits, parts[1], 1, 30)  # 5 levels
    return shallow, deep


@pytest.fixture(scope="module")
def vggs(digits, parts):
    torch.manual_seed(1)
    shallow = _train(VGG(digits.input_shape, 10, layout=SHALLOW_VGG), digits, parts[0], 0, 40)
    torch.manual_seed(2)
    deep = _train(VGG(digits.input_shape, 10, layout=DEEP_VGG), digits, parts[1], 1, 40)
    return shallow, deep


def _same_shapes(models):
    sds = [m.state_dict() for m in models]
    return all(sd.keys() == sds[0].keys() and all(v.shape == sds[0][k].shape for k, v in sd.items())
               for sd in sds[1:])


def _fuse_and_compare(pair, digits, fusion, name):
    shallow, deep = pair
    base = [_acc(shallow, digits), _acc(deep, digits)]
    mean_base = float(np.mean(base))
    balanced, info = align_models([shallow, deep], fusion, balance="add")
    assert balanced[0] is deep and info.reference == 1
    assert all(b.num_levels == deep.num_levels for b in balanced)
    results = {}
    for method in ("kf-linear", "hf-linear", "vanilla"):
        if method == "hf-linear" and balanced[0].level_widths() != balanced[1].level_widths():
            continue
        if method == "vanilla" and not _same_shapes(balanced):
            continue
        fused = neurofuse.fuse(balanced, fusion, method=method, progress=False)
        assert type(fused) is type(deep) and fused.num_levels == deep.num_levels
        results[method] = _acc(fused, digits)
    print(f"\n{name}: base {base} (mean {mean_base:.4f}), alignment {info.pairs[0].alignment}, "
          f"fused {results}")
    return base, mean_base, results


def test_mlps_with_2_and_4_hidden_layers_fuse_end_to_end(mlps, digits, digits_fusion):
    base, mean_base, res = _fuse_and_compare(mlps, digits, digits_fusion, "mlp 3 vs 5 levels")
    assert set(res) == {"kf-linear", "hf-linear", "vanilla"}  # equal widths: every method applies
    assert res["kf-linear"] > mean_base
    assert res["hf-linear"] > mean_base
    assert res["kf-linear"] > res["vanilla"] + 0.2
    assert res["hf-linear"] > res["vanilla"] + 0.2


def test_vggs_with_6_and_8_conv_levels_fuse_end_to_end(vggs, digits, digits_fusion):
    base, mean_base, res = _fuse_and_compare(vggs, digits, digits_fusion, "vgg 7 vs 9 levels")
    assert res["kf-linear"] > mean_base
    if "hf-linear" in res:
        assert res["hf-linear"] > mean_base
    if "vanilla" in res:
        assert res["kf-linear"] > res["vanilla"] + 0.2
    assert "vanilla" in res  # identities were inserted where the reference has no pooling


@pytest.mark.parametrize("arch", ["mlps", "vggs"])
def test_teacher_student_fusion_into_the_shallow_architecture(arch, request, digits, digits_fusion):
    """Compression: fuse the deep and the shallow model into the shallow architecture."""
    shallow, deep = request.getfixturevalue(arch)
    balanced, info = align_models([deep, shallow], digits_fusion, reference=1, balance="merge")
    assert balanced[0] is shallow and info.pairs[0].shallower == "reference"
    fused = neurofuse.fuse(balanced, digits_fusion, method="kf-linear", progress=False)
    assert type(fused) is type(shallow) and fused.level_widths() == shallow.level_widths()
    assert sum(p.numel() for p in fused.parameters()) < sum(p.numel() for p in deep.parameters())
    acc_s, acc_d, acc_f = _acc(shallow, digits), _acc(deep, digits), _acc(fused, digits)
    print(f"\nteacher-student {arch}: shallow {acc_s:.4f}, deep {acc_d:.4f}, fused shallow {acc_f:.4f}, "
          f"groups {info.pairs[0].groups}")
    assert acc_f > (acc_s + acc_d) / 2
    assert acc_f > acc_s


def test_three_models_of_three_depths_fuse_into_the_deepest(mlps, digits, parts, digits_fusion):
    shallow, deep = mlps
    torch.manual_seed(3)
    single = _train(MLP(digits.input_shape, 10, [48]), digits, parts[1], 5, 30)  # 2 levels
    models = [shallow, single, deep]
    balanced, info = align_models(models, digits_fusion)  # add: the deepest is the reference
    assert info.order == [2, 0, 1] and [b.num_levels for b in balanced] == [5, 5, 5]
    fused = neurofuse.fuse(balanced, digits_fusion, method="kf-linear", progress=False)
    accs = [_acc(m, digits) for m in models]
    acc_f = _acc(fused, digits)
    print(f"\nthree mlps: base {accs}, fused {acc_f:.4f}")
    assert acc_f > float(np.mean(accs))
