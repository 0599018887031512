"""Tests of neurofuse._loop: the one training loop behind training, fine-tuning, kd-head, kf-gradient."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neurofuse._loop import EpochEnd, run_epochs, seeded_rng
from neurofuse.errors import ConfigError

SRC = Path(run_epochs.__code__.co_filename).parent


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(53, 6, generator=g)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2)), x, y


def _reference(model, x, y, epochs, bs, seed, lr_at):
    """The loop every trainer had before it was shared, written out by hand."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(x.shape[0], generator=gen)
        total = 0.0
        for b, start in enumerate(range(0, x.shape[0], bs)):
            idx = order[start:start + bs]
            for group in opt.param_groups:
                group["lr"] = lr_at(epoch, b)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * idx.numel()
        losses.append(total / x.shape[0])
    return losses


def test_reproduces_the_hand_written_loop_bit_for_bit():
    lr_at = lambda e, b: 1e-2 / (1 + e + 0.1 * b)  # noqa: E731
    a, x, y = _problem()
    expected = _reference(a, x, y, epochs=4, bs=10, seed=3, lr_at=lr_at)
    b, _, _ = _problem()
    opt = torch.optim.Adam(b.parameters(), lr=1e-2)
    res = run_epochs(b, opt, n=x.shape[0], batch_size=10, epochs=4,
                     generator=torch.Generator().manual_seed(3), lr_at=lr_at,
                     batch_loss=lambda idx: F.cross_entropy(b(x[idx]), y[idx]),
                     diverged=lambda e, loss: "diverged")
    assert res.train_loss == expected and res.epochs == 4
    assert res.lr == [lr_at(e, 5) for e in range(4)]
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_end_epoch_can_stop_early_and_sets_the_postfix():
    model, x, y = _problem()
    seen = []

    def end(epoch, loss, lr):
        seen.append((epoch, lr))
        return EpochEnd({"loss": loss}, stop=epoch == 2)

    res = run_epochs(model, torch.optim.SGD(model.parameters(), lr=0.1), n=53, batch_size=16,
                     epochs=10, generator=torch.Generator().manual_seed(0),
                     batch_loss=lambda idx: F.cross_entropy(model(x[idx]), y[idx]),
                     diverged=lambda e, loss: "x", end_epoch=end)
    assert res.epochs == 3 and seen == [(0, None), (1, None), (2, None)]


def test_skipped_batches_are_not_counted():
    model, x, y = _problem()
    calls = []

    def loss(idx):
        calls.append(idx.numel())
        return None if idx.numel() < 10 else F.cross_entropy(model(x[idx]), y[idx])

    before = [p.clone() for p in model.parameters()]
    res = run_epochs(model, torch.optim.SGD(model.parameters(), lr=0.1), n=53, batch_size=50,
                     epochs=1, generator=torch.Generator().manual_seed(0), batch_loss=loss,
                     diverged=lambda e, loss: "x")
    assert calls == [50, 3] and res.train_loss[0] > 0
    assert any(not torch.equal(p, q) for p, q in zip(before, model.parameters()))


def test_a_non_finite_loss_is_a_one_line_config_error_naming_the_epoch():
    model, x, y = _problem()
    with pytest.raises(ConfigError, match=r"^boom at epoch 1 \(nan\)$"):
        run_epochs(model, torch.optim.SGD(model.parameters(), lr=0.1), n=53, batch_size=8, epochs=3,
                   generator=torch.Generator().manual_seed(0),
                   batch_loss=lambda idx: model(x[idx]).sum() * float("nan"),
                   diverged=lambda e, loss: f"boom at epoch {e} ({loss})")


def test_seeded_rng_repeats_draws_and_restores_the_callers_state():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    with seeded_rng(7, torch.device("cpu")):
        a = torch.rand(3)
    with seeded_rng(7, torch.device("cpu")):
        b = torch.rand(3)
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), state)


def test_no_module_but_the_loop_steps_an_optimizer():
    offenders = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if p.name != "_loop.py"
                 and ".backward(" in p.read_text(encoding="utf-8")]
    assert not offenders, f"train through neurofuse._loop.run_epochs: {offenders}"
