"""Every tensor of a fusion stays on the fusion device: no silent host round trips.

Runs on the CPU: the fusion device is ``"cpu:0"``, so a request for the host (``.cpu()``,
``.numpy()``, ``.to("cpu")``, ``numpy.asarray``) is told apart from a move to the fusion device
(:class:`neurofuse.testing.HostTransfers`).  What may go to the host is only what a CPU solver
needs: the ``[k, k]`` cost matrix of a Hungarian matching or of an optimal transport,
kf-gradient's random re-initialisation (drawn on the CPU so that a seed gives the same levels on
every device) and, on a CPU-only machine, the Gram sums scipy's BLAS accumulates and the Gram
matrix handed to scipy's eigendecomposition (a GPU does both on the device).  On a machine with a
GPU the same checks run on ``"cuda"``.
"""

from __future__ import annotations

import pytest
import torch

import neurofuse
from neurofuse.approximation import LinearStats
from neurofuse.models import VGG
from neurofuse.testing import CPU_LAPACK, HostTransfers

#: on the CPU the closed form's Gram sums and eigendecomposition are scipy's BLAS / LAPACK (numpy
#: views, no copy); on a GPU they run on the device, so the "cuda" runs allow nothing there
CPU_EIGH = CPU_LAPACK
#: where each method may send a matrix to the host, and why
ALLOWED = {
    "kf-linear": CPU_EIGH,
    "hf-linear": ("hungarian_grouping",) + CPU_EIGH,        # scipy's linear_sum_assignment
    "otfusion": ("_otfusion:_transports", "_otfusion:_fuse"),   # POT's exact solver (numpy)
    # scipy's linear_sum_assignment, and the permutation matrix NeuronMap.from_permutation builds
    # on the host from its result (never on the device)
    "git-rebasin": ("_rebasin:", "_layout:from_permutation"),
    "kf-gradient": ("_hidden_targets", "random_like"),      # LAP of the K-means labels; CPU RNG
}
#: kf-gradient with two epochs per level (every torch call passes through the log: keep it short)
OPTIONS = {"kf-gradient": {"levels": {"epochs": 2}, "head": {"epochs": 2}}}
DEVICES = ["cpu:0"] + (["cuda"] if torch.cuda.is_available() else [])


def _models():
    out = []
    for s in range(2):
        torch.manual_seed(s)
        out.append(VGG((1, 8, 8), 10, width_multiplier=0.25).eval())
    return out


def _fuse(method, data, device, **kw):
    with HostTransfers() as log:
        fused = neurofuse.fuse(_models(), data, method=method, device=device, progress=False, **kw)
    return fused, log


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", sorted(ALLOWED))
def test_no_matrix_leaves_the_fusion_device_except_a_cpu_solvers_cost_matrix(method, device, digits_fusion):
    if method == "otfusion":
        pytest.importorskip("ot")
    x, y = digits_fusion
    fused, log = _fuse(method, (x[:200], y[:200]), device, **OPTIONS.get(method, {}))
    allowed = ALLOWED[method] if device.startswith("cpu") else tuple(a for a in ALLOWED[method] if a not in CPU_EIGH)
    assert log.matrices(allowed) == []
    for t in log.matrices():   # allowed: square matrices (costs, Gram), CPU inits, dsyrk's design rows
        assert ("random_like" in t.where or "_add_gram" in t.where
                or (len(t.shape) == 2 and t.shape[0] == t.shape[1])), t
    want = torch.device(device).type
    assert all(p.device.type == want for p in fused.parameters())


def test_the_check_finds_a_host_round_trip(digits_fusion, monkeypatch):
    """A features matrix sent to the host and back inside the closed form is caught."""
    solve = LinearStats.solve

    def leaky(self, *a, **k):
        sol = solve(self, *a, **k)
        sol.features = torch.as_tensor(sol.features.cpu().numpy()).to(sol.features.device)
        return sol

    monkeypatch.setattr(LinearStats, "solve", leaky)
    x, y = digits_fusion
    _, log = _fuse("kf-linear", (x[:200], y[:200]), "cpu:0")
    assert any(t.op == "numpy" and "solve_level" in t.where for t in log.matrices())


def test_the_check_finds_an_explicit_move_to_the_host(digits_fusion, monkeypatch):
    import neurofuse.methods._levelwise as lw

    centroids = lw.centroids

    def to_host(points, *a, **k):
        return centroids(points.to("cpu"), *a, **k)

    monkeypatch.setattr(lw, "centroids", to_host)
    x, y = digits_fusion
    _, log = _fuse("kf-linear", (x[:200], y[:200]), "cpu:0")
    assert {t.op for t in log.matrices(ALLOWED["kf-linear"])} == {"to"}
