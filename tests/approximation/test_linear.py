"""Streamed least squares equals the dense pseudo-inverse solution."""

import pytest
import torch
from torch import nn

from neurofuse.approximation import LinearStats, assign_affine, design_matrix


def _stream(x, a, batch):
    st = LinearStats()
    for i in range(0, x.shape[0], batch):
        st.update(x[i:i + batch], a[i:i + batch])
    return st


@pytest.mark.parametrize("rows,d,m", [(200, 10, 7), (50, 80, 12)])  # over- and under-determined
def test_streamed_weights_equal_dense_pinv(rows, d, m):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, d, generator=g, dtype=torch.float64)
    a = torch.randn(rows, m, generator=g, dtype=torch.float64)
    sol = _stream(x, a, 17).solve(rtol=1e-10)
    dense = torch.linalg.pinv(x) @ a
    assert torch.allclose(sol.weights, dense, atol=1e-8)


@pytest.mark.parametrize("rows", [200, 8])     # summed statistics, and kept design rows (n <= d)
def test_scaling_the_targets_after_the_pass_equals_scaling_them_before(rows):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(rows, 10, generator=g, dtype=torch.float64)
    a = torch.randn(rows, 6, generator=g, dtype=torch.float64)
    f = torch.tensor([0.5, 2.0, 1.0, 3.0, 0.1, 1.5], dtype=torch.float64)
    after = _stream(x, a, 64)
    after.scale_targets(f)
    before = _stream(x, a * f, 64)
    assert torch.allclose(after.sq, before.sq) and torch.allclose(after.cross, before.cross)
    s_after, s_before = after.solve(ridge=1e-3), before.solve(ridge=1e-3)
    assert torch.allclose(s_after.weights, s_before.weights, atol=1e-10)
    assert torch.allclose(s_after.residual, s_before.residual, atol=1e-10)


def test_a_linear_on_tokens_has_one_design_row_per_token():
    layer = nn.Linear(5, 3)
    u = torch.randn(4, 6, 5)
    x = design_matrix(layer, u)
    assert x.shape == (24, 6)
    assert torch.allclose(x[:, :5] @ layer.weight.T + layer.bias, layer(u).reshape(24, 3).detach(), atol=1e-6)


def test_features_preserve_distances_between_projected_neurons():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(100, 6, generator=g, dtype=torch.float64)
    a = torch.randn(100, 5, generator=g, dtype=torch.float64)
    sol = _stream(x, a, 32).solve(rtol=1e-10)
    proj = x @ sol.weights                                    # P a_j
    d_proj = torch.cdist(proj.T, proj.T)
    d_feat = torch.cdist(sol.features, sol.features)
    assert torch.allclose(d_proj, d_feat, atol=1e-8)
    assert torch.allclose(sol.residual, ((a - proj) ** 2).sum(0), atol=1e-8)


def test_rank_deficient_inputs_give_the_minimum_norm_solution():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(60, 3, generator=g, dtype=torch.float64)
    x = torch.cat([base, base[:, :1]], 1)                    # duplicated column: rank 3 of 4
    a = torch.randn(60, 2, generator=g, dtype=torch.float64)
    sol = _stream(x, a, 7).solve()
    assert sol.rank == 3
    assert torch.allclose(sol.weights, torch.linalg.pinv(x) @ a, atol=1e-8)


def test_ridge_shrinks_the_weights():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    a = torch.randn(40, 2, generator=g, dtype=torch.float64)
    st = _stream(x, a, 40)
    assert st.solve(ridge=1.0).weights.norm() < st.solve().weights.norm()


def test_conv_design_matrix_reproduces_the_convolution():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, stride=2)
    u = torch.randn(2, 3, 7, 7)
    x = design_matrix(conv, u)
    w = torch.cat([conv.weight.reshape(4, -1), conv.bias[:, None]], 1).T
    out = (x @ w)
    ref = conv(u).permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.allclose(out, ref, atol=1e-5)
    other = nn.Conv2d(3, 4, 3, padding=1, stride=2)
    assign_affine(other, w.double())
    assert torch.allclose(other(u), conv(u), atol=1e-5)


@pytest.mark.parametrize("rows,d", [(300, 12), (20, 40)])   # full rank and rank-deficient Gram
def test_shared_input_statistics_give_the_general_solution_without_cross(rows, d):
    """Outputs a_j = X p_j (the first level): statistics without X^T A solve to w_j = p_j, the
    general path's answer, with features at the same pairwise distances and zero residuals."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(rows, d, generator=g, dtype=torch.float64)
    x[:, 3] = 0.0                                             # an input that never fires
    p = torch.randn(d, 9, generator=g, dtype=torch.float64)
    a = x @ p
    full, shared = LinearStats(), LinearStats(cross=False)
    for i in range(0, rows, 7):
        full.update(x[i:i + 7], a[i:i + 7])
        shared.update(x[i:i + 7], a[i:i + 7])
    assert "cross" not in shared.state()
    restored = LinearStats.from_state(shared.state())          # travels without X^T A
    assert not restored.has_cross
    ref, sol = full.solve(prior=p), restored.solve(prior=p)
    assert torch.allclose(sol.weights, p) and torch.allclose(ref.weights, p, atol=1e-6)
    d_ref = torch.cdist(ref.features.double(), ref.features.double())
    d_sol = torch.cdist(sol.features.double(), sol.features.double())
    assert torch.allclose(d_sol, d_ref, rtol=1e-4, atol=1e-4 * float(d_ref.max()))
    assert float(sol.residual.max()) <= 1e-4 * float(full.sq.max())
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2])
    w = torch.rand(9, generator=g, dtype=torch.float64)
    assert torch.allclose(sol.combine(w, labels, 3), ref.combine(w, labels, 3), atol=1e-6)


def test_shared_input_statistics_need_the_prior():
    st = LinearStats(cross=False)
    st.update(torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64))
    with pytest.raises(Exception, match="prior"):
        st.solve()


def test_kept_rows_are_exact_grouping_coordinates_and_the_gram_matrix_is_formed_on_demand():
    """With n <= d rows (rows=True) the base outputs themselves are the grouping coordinates:
    the same pairwise distances as the Cholesky coordinates, the same weights; the Gram matrix
    still comes out exact when asked for (state), and past d rows the rows are let go."""
    g = torch.Generator().manual_seed(11)
    d, rows = 40, 30
    x = torch.randn(rows, d, generator=g, dtype=torch.float64)
    x[:, 5] = 0.0
    p = torch.randn(d, 12, generator=g, dtype=torch.float64)
    a = x @ p
    plain, kept = LinearStats(cross=False), LinearStats(cross=False, rows=True)
    for i in range(0, rows, 8):
        plain.update(x[i:i + 8], a[i:i + 8])
        kept.update(x[i:i + 8], a[i:i + 8])
    assert kept.kept_rows is not None and kept.kept_rows.shape == (rows, 12)
    ref, sol = plain.solve(prior=p), kept.solve(prior=p)
    assert sol.features.shape == (12, rows)                     # n coordinates, not d
    assert torch.equal(sol.weights, p) and sol.rank == ref.rank == rows
    d_ref = torch.cdist(ref.features.double(), ref.features.double())
    d_sol = torch.cdist(sol.features.double(), sol.features.double())
    assert torch.allclose(d_sol, d_ref, rtol=1e-4, atol=1e-4 * float(d_ref.max()))
    assert float(sol.residual.abs().max()) == 0.0
    state = kept.state()                                        # sums only, Gram included
    assert set(state) == {"count", "gram", "sq"}
    assert torch.allclose(state["gram"], plain.state()["gram"], rtol=1e-12, atol=1e-10)
    # merge concatenates while the union has at most d rows; from_state carries no rows
    other = LinearStats(cross=False, rows=True)
    other.update(x[:5], a[:5])
    merged = LinearStats(cross=False, rows=True).merge(kept).merge(other)
    assert merged.kept_rows is not None and torch.equal(merged.kept_rows[rows:], a[:5].float())
    assert LinearStats.from_state(kept.state()).merge(other).kept_rows is None
    # beyond d rows: no rows kept, and the statistics equal the plain ones
    big = LinearStats(cross=False, rows=True)
    more = torch.cat([x, x])
    big.update(more[:35], (more @ p)[:35])
    big.update(more[35:], (more @ p)[35:])
    assert big.kept_rows is None
    full = LinearStats(cross=False)
    full.update(more, more @ p)
    assert torch.allclose(big.state()["gram"], full.state()["gram"], rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("ridge", [0.0, 0.5, "auto"])
def test_fewer_rows_than_inputs_solve_through_the_row_gram_like_the_input_gram(ridge):
    """With n < d kept rows the eigenpairs come from X Xᵀ (n x n); the solution, features,
    residuals, rank, group means and, with ridge="auto", the penalty GCV chooses (from the
    eigenvalues of XᵀX: the nonzero ones of X Xᵀ) and the diagnostics are those of the d x d
    Gram matrix."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(40, 70, generator=g, dtype=torch.float64)
    x = torch.cat([base, base[:, :3], torch.zeros(40, 2, dtype=torch.float64)], 1)   # 75 inputs
    a = torch.randn(40, 9, generator=g, dtype=torch.float64)
    prior = torch.randn(75, 9, generator=g, dtype=torch.float64)
    dual = _stream(x, a, 16)
    primal = LinearStats.from_state(_stream(x, a, 16).state())   # sums only: the d x d path
    assert dual.gram.stride() == (0, 0)                     # not formed yet
    s_dual, s_primal = dual.solve(ridge=ridge, prior=prior), primal.solve(ridge=ridge, prior=prior)
    assert dual.gram.stride() == (0, 0)                     # no d x d Gram matrix, ridge or not
    assert s_dual.rank == s_primal.rank == 40
    assert s_dual.diagnostics is not None and s_primal.diagnostics is not None
    assert s_dual.diagnostics.penalty == s_primal.diagnostics.penalty
    assert s_dual.diagnostics.columns == s_primal.diagnostics.columns == 73   # two inputs never fire
    assert s_dual.diagnostics.dof == pytest.approx(s_primal.diagnostics.dof, rel=1e-9)
    assert s_dual.diagnostics.condition == pytest.approx(s_primal.diagnostics.condition, rel=1e-6)
    for name in ("features", "residual", "weights"):
        # with a ridge the d x d path adds sqrt(rounding-size eigenvalue) of the null directions
        tol = 1e-5 if ridge != 0.0 and name == "features" else 1e-8
        assert torch.allclose(getattr(s_dual, name), getattr(s_primal, name), atol=tol), name
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    w = torch.rand(9, generator=g, dtype=torch.float64)
    assert torch.allclose(s_dual.combine(w, labels, 3), s_primal.combine(w, labels, 3), atol=1e-8)
    assert torch.allclose(primal.gram, x.T @ x)
    assert torch.allclose(dual.state()["gram"], x.T @ x)    # formed when it is asked for
    again = dual.solve(ridge=ridge, prior=prior)            # and the rows still solve
    assert torch.allclose(again.features, s_dual.features, atol=1e-12)


@pytest.mark.parametrize("d", [12, 300])   # the matrix product and the dsyrk paths of the Gram sum
def test_float64_chunks_of_a_batch_sum_to_the_whole_batch_statistics(monkeypatch, d):
    """A batch is converted to float64 a few rows at a time (``CHUNK_BYTES``); the sums are
    those of the whole batch, float32 inputs included."""
    from neurofuse import stats

    g = torch.Generator().manual_seed(5)
    x = torch.randn(1000, d, generator=g)
    a = torch.randn(1000, 9, generator=g)
    whole = LinearStats()
    whole.update(x, a)
    monkeypatch.setattr(stats, "CHUNK_BYTES", 8 * d * 300)   # 300-row chunks: 4 of them
    chunked = LinearStats()
    chunked.update(x, a)
    ref = x.double()
    for name, want in (("gram", ref.T @ ref), ("cross", ref.T @ a.double()), ("sq", (a.double() ** 2).sum(0))):
        assert torch.allclose(getattr(chunked, name), want, rtol=1e-12, atol=1e-9), name
        assert torch.allclose(getattr(whole, name), want, rtol=1e-12, atol=1e-9), name
    assert chunked.rows == whole.rows == 1000
