"""The ridge chosen by generalised cross-validation: the maths against brute force from the rows."""

import pytest
import torch

from neurofuse.approximation import FitDiagnostics, LinearStats, fit_warning
from neurofuse.approximation._ridge import PENALTY_GRID


def _stats(x, a, batch=13):
    st = LinearStats()
    for i in range(0, x.shape[0], batch):
        st.update(x[i:i + batch], a[i:i + batch])
    return st


def _problem(rows, d, m, noise, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=g, dtype=torch.float64) @ torch.diag(torch.logspace(0, -2, d, dtype=torch.float64))
    w = torch.randn(d, m, generator=g, dtype=torch.float64)
    a = x @ w + noise * torch.randn(rows, m, generator=g, dtype=torch.float64)
    p = w + 0.5 * torch.randn(d, m, generator=g, dtype=torch.float64)
    return x, a, p


def _brute_gcv(x, a, p, lam):
    """GCV from the rows: n ||A - X W||^2 / (n - tr H)^2, W shrunk toward p, H the hat matrix."""
    n, d = x.shape
    if lam == 0:
        pinv = torch.linalg.pinv(x)
        w = pinv @ a if p is None else pinv @ a + (torch.eye(d, dtype=x.dtype) - pinv @ x) @ p
        hat = x @ pinv
    else:
        reg = x.T @ x + lam * torch.eye(d, dtype=x.dtype)
        w = torch.linalg.solve(reg, x.T @ a + (0 if p is None else lam * p))
        hat = x @ torch.linalg.solve(reg, x.T)
    rss = float(((a - x @ w) ** 2).sum())
    return n * rss / (n - float(torch.trace(hat))) ** 2, w


@pytest.mark.parametrize("rows,d,with_prior", [(60, 50, True), (60, 50, False), (300, 20, True), (40, 60, True)])
def test_auto_penalty_is_the_argmin_of_brute_force_gcv_and_its_weights_are_ridge(rows, d, with_prior):
    """Over- and under-determined, near square: the penalty the statistics choose is the grid
    point where GCV computed from the rows is smallest, and the weights are that ridge's."""
    x, a, p = _problem(rows, d, 7, noise=0.3)
    prior = p if with_prior else None
    sol = _stats(x, a).solve(ridge="auto", prior=prior)
    scale = float(torch.diagonal(x.T @ x).mean())
    scores = [_brute_gcv(x, a, prior, mu * scale)[0] if rows > d or mu > 0 else float("inf")
              for mu in PENALTY_GRID]
    best = min(range(len(scores)), key=scores.__getitem__)
    assert sol.diagnostics.penalty == PENALTY_GRID[best]
    _, w = _brute_gcv(x, a, prior, PENALTY_GRID[best] * scale)
    assert torch.allclose(sol.weights, w, atol=1e-7 * float(w.abs().max()))
    fitted = x @ sol.weights
    assert torch.allclose(sol.residual, ((a - fitted) ** 2).sum(0), rtol=1e-6, atol=1e-8)
    # features: coordinates of the fitted values, at their pairwise distances
    assert torch.allclose(torch.cdist(sol.features, sol.features), torch.cdist(fitted.T, fitted.T),
                          atol=1e-6 * float(fitted.abs().max()))


def test_gcv_curve_equals_brute_force_at_every_penalty():
    from neurofuse.approximation._ridge import gcv_curve

    x, a, p = _problem(70, 60, 5, noise=0.2, seed=4)
    st = _stats(x, a)
    e, u = torch.linalg.eigh(x.T @ x)
    keep = e > 1e-12 * e.max()
    t = u.T @ (x.T @ (a - x @ p))
    r = a - x @ p
    rss0 = (r * r).sum(0) - (t[keep] ** 2 / e[keep, None]).sum(0)
    lams = torch.tensor([0.0, 1e-4, 1e-2, 1.0, 30.0], dtype=torch.float64)
    curve = gcv_curve(e[keep], t[keep], rss0, st.rows, lams)
    brute = torch.tensor([_brute_gcv(x, a, p, float(lam))[0] for lam in lams], dtype=torch.float64)
    assert torch.allclose(curve, brute, rtol=1e-6)


def test_the_penalty_comes_from_additive_statistics_alone():
    """Shards merged, and statistics sent as state dicts (federated clients), choose the same
    penalty and weights as the statistics of the union."""
    x, a, p = _problem(90, 80, 6, noise=0.3, seed=2)
    whole = _stats(x, a)
    shards = [_stats(x[i:i + 30], a[i:i + 30], batch=7) for i in range(0, 90, 30)]
    merged = LinearStats.from_state(shards[0].state())
    for s in shards[1:]:
        merged.merge(LinearStats.from_state(s.state()))
    ref, sol = whole.solve(ridge="auto", prior=p), merged.solve(ridge="auto", prior=p)
    assert sol.diagnostics.penalty == ref.diagnostics.penalty > 0
    assert torch.allclose(sol.weights, ref.weights, atol=1e-9)


def test_auto_keeps_the_pseudo_inverse_where_no_penalty_helps():
    """Exact targets (nothing to overfit): GCV is zero at penalty 0, and the fit is the one
    ridge=0 gives (ridge=0 itself is the pseudo-inverse path as before issue 23, unchanged)."""
    x, _, p = _problem(200, 12, 4, noise=0.0, seed=3)
    a = x @ torch.randn(12, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    st = _stats(x, a)
    auto, zero = st.solve(ridge="auto", prior=p), st.solve(ridge=0.0, prior=p)
    assert auto.diagnostics.penalty == 0.0
    assert torch.allclose(auto.weights, zero.weights, rtol=1e-12, atol=1e-12)
    assert torch.allclose(auto.features, zero.features, rtol=1e-12, atol=1e-12)
    assert torch.allclose(zero.weights, torch.linalg.pinv(x) @ a, atol=1e-9)


def test_a_fixed_ridge_shrinks_toward_the_prior():
    x, a, p = _problem(30, 40, 3, noise=0.1, seed=5)
    x[:, 7] = 0.0                                           # an input never excited keeps the prior
    lam = 0.05 * float(torch.diagonal(x.T @ x).mean())
    ref = torch.linalg.solve(x.T @ x + lam * torch.eye(40, dtype=x.dtype), x.T @ a + lam * p)
    sol = _stats(x, a).solve(ridge=0.05, prior=p)
    assert torch.allclose(sol.weights, ref, atol=1e-9)
    assert torch.allclose(sol.weights[7], p[7])
    labels, w = torch.tensor([0, 1, 1]), torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
    expect = torch.stack([ref[:, 0], (2 * ref[:, 1] + ref[:, 2]) / 3], 1)
    assert torch.allclose(sol.combine(w, labels, 2), expect, atol=1e-9)


def test_diagnostics_are_the_condition_number_and_the_trace_of_the_hat_matrix():
    x, a, _ = _problem(50, 50, 4, noise=0.5, seed=6)
    sol = _stats(x, a).solve(ridge="auto")
    s = torch.linalg.svdvals(x)
    fit = sol.diagnostics
    assert (fit.rows, fit.columns) == (50, 50)
    assert fit.condition == pytest.approx(float(s.max() / s.min()), rel=1e-6)
    lam = fit.penalty * float(torch.diagonal(x.T @ x).mean())
    hat = x @ torch.linalg.solve(x.T @ x + lam * torch.eye(50, dtype=x.dtype), x.T)
    assert fit.penalty > 0 and fit.dof == pytest.approx(float(torch.trace(hat)), rel=1e-9)
    assert _stats(x, a).solve(ridge=0.0).diagnostics.dof == 50


def test_the_warning_names_square_and_ill_conditioned_fits_and_what_was_done():
    square = FitDiagnostics(rows=400, columns=400, condition=4.8e4, penalty=0.0, dof=400.0)
    assert "nearly square (400 rows, 400 inputs)" in fit_warning(square, 0.0)
    assert "ridge='auto'" in fit_warning(square, 0.0)
    chosen = FitDiagnostics(rows=400, columns=400, condition=4.8e4, penalty=0.03, dof=180.0)
    assert "ridge 0.03 chosen by GCV" in fit_warning(chosen, "auto")
    ill = FitDiagnostics(rows=4000, columns=400, condition=1e6, penalty=0.0, dof=400.0)
    assert fit_warning(ill, "auto").startswith("least-squares fit ill-conditioned")
    assert fit_warning(FitDiagnostics(4000, 400, 300.0, 0.0, 400.0), 0.0) is None


def test_bad_ridge_values_are_refused():
    from neurofuse.errors import ConfigError

    st = _stats(*_problem(20, 5, 2, noise=0.1)[:2])
    for bad in ("gcv", -1.0):
        with pytest.raises(ConfigError, match="ridge"):
            st.solve(ridge=bad)
