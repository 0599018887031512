"""On a CUDA device the engine gives what it gives on the CPU (skipped without a GPU).

``benchmarks/gpu_check.py`` runs these, ``tests/methods/test_device.py`` (which adds ``"cuda"`` to
its devices on a GPU) and the 4-VGG11 benchmark when a device is lent; ``tests/test_gpu_check.py``
runs its dry mode on the CPU.
"""

from __future__ import annotations

import pytest
import torch

import neurofuse
from neurofuse.approximation import LinearStats
from neurofuse.grouping import weighted_kmeans
from neurofuse.levels import LevelStream
from neurofuse._fusion_set import FusionSet
from neurofuse.methods import get_method
from neurofuse.methods._memory import plan_memory
from neurofuse.models import VGG

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _vggs(n=2, device="cpu"):
    out = []
    for s in range(n):
        torch.manual_seed(s)
        out.append(VGG((1, 8, 8), 10, width_multiplier=0.25).eval().to(device))
    return out


def test_closed_form_statistics_and_eigendecomposition_on_the_device_match_the_cpu():
    g = torch.Generator().manual_seed(0)
    x, a = torch.randn(300, 40, generator=g), torch.randn(300, 9, generator=g)
    sols = []
    for dev in ("cpu", "cuda"):
        st = LinearStats()
        for i in range(0, 300, 64):
            st.update(x[i:i + 64].to(dev), a[i:i + 64].to(dev))
        sols.append(st.solve())
    assert sols[1].features.device.type == "cuda"
    assert torch.allclose(sols[0].features, sols[1].features.cpu(), atol=1e-8)
    assert torch.allclose(sols[0].weights, sols[1].weights.cpu(), atol=1e-8)


def test_kmeans_on_the_device_reaches_the_cpu_cost():
    g = torch.Generator().manual_seed(1)
    pts = torch.randn(2000, 50, generator=g)
    w = torch.rand(2000, generator=g) + 0.1
    _, _, cpu_cost = weighted_kmeans(pts, w, 64, seed=0, refine=False)
    labels, centres, gpu_cost = weighted_kmeans(pts.cuda(), w.cuda(), 64, seed=0, refine=False)
    assert labels.device.type == "cuda" and centres.device.type == "cuda"
    assert gpu_cost <= cpu_cost * 1.01


def test_the_level_stream_spills_device_batches_and_reads_them_back_to_the_device():
    data = FusionSet(torch.randn(100, 3, 8, 8), None, batch_size=32)
    with LevelStream(data, 1, "cuda", memory_budget=0) as st:
        for b in st:
            assert b.inputs[0].device.type == "cuda"
            b.keep(0, b.inputs[0] * 2)
        st.advance({0: None})
        got = torch.cat([b.inputs[0] for b in st])
    assert st.spilled == 1 and got.device.type == "cuda"
    assert torch.allclose(got.cpu(), data.x * 2)


@pytest.mark.parametrize("method", ["kf-linear", "hf-linear", "otfusion", "git-rebasin"])
def test_a_fusion_on_the_device_matches_the_fusion_on_the_cpu(method, digits_fusion):
    if method == "otfusion":
        pytest.importorskip("ot")
    x, y = digits_fusion
    ref = neurofuse.fuse(_vggs(), (x, y), method=method, progress=False)
    got = neurofuse.fuse(_vggs(), (x, y), method=method, device="cuda", progress=False)
    assert all(p.device.type == "cuda" for p in got.parameters())
    with torch.no_grad():
        a, b = ref(x[:64]), got(x[:64].cuda()).cpu()
    assert (a.argmax(1) == b.argmax(1)).float().mean() >= 0.95
    assert torch.allclose(a, b, atol=1e-2 * float(a.abs().max()))


def test_auto_budget_compares_with_the_devices_free_memory():
    method = get_method("kf-linear")(device="cuda")
    plan = plan_memory(method, _vggs(), FusionSet(torch.zeros(400, 1, 8, 8), None), "auto")
    free, _ = torch.cuda.mem_get_info()
    assert plan.estimate < free
