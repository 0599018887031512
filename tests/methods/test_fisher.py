"""Fisher merging, plain and aligned."""

from __future__ import annotations

import pytest
import torch

import neurofuse
from neurofuse.errors import ConfigError
from neurofuse.methods import AlignedFisherMerging, FisherMerging, get_method

from .permuted import permute_spaces


def test_fusing_a_model_with_itself_gives_it_back(trained_mlp, digits_fusion):
    fused = neurofuse.fuse([trained_mlp, trained_mlp], digits_fusion, method="fisher", progress=False)
    for p, q in zip(fused.parameters(), trained_mlp.parameters()):
        assert torch.allclose(p, q, atol=1e-5)


@pytest.mark.parametrize("align", ["activations", "weights"])
def test_aligned_fisher_gives_back_the_function_of_a_permuted_copy(align, trained_mlp, digits, digits_fusion):
    twin, _ = permute_spaces(trained_mlp, seed=2)
    fused = neurofuse.fuse([trained_mlp, twin], digits_fusion, method="fisher-aligned", align=align,
                           progress=False)
    with torch.no_grad():
        assert float((fused(digits.x_test[:64]) - trained_mlp(digits.x_test[:64])).abs().max()) < 1e-4


def test_the_merge_is_a_convex_combination_element_by_element(trained_mlp, digits_fusion):
    """Fisher weights are positive: every merged parameter lies between the two models' values."""
    other = trained_mlp.clone()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fused = neurofuse.fuse([trained_mlp, other], digits_fusion, method="fisher", progress=False)
    for p, q, r in zip(trained_mlp.parameters(), other.parameters(), fused.parameters()):
        lo, hi = torch.minimum(p, q), torch.maximum(p, q)
        assert bool(((r >= lo - 1e-6) & (r <= hi + 1e-6)).all())


def test_which_is_which():
    assert get_method("fisher") is FisherMerging and not FisherMerging.fuses_levels
    assert get_method("fisher-aligned") is AlignedFisherMerging and AlignedFisherMerging.fuses_levels
    assert AlignedFisherMerging.Options().align == "activations"
    with pytest.raises(ConfigError, match="option 'align' must be one of"):
        AlignedFisherMerging(align="none")
    with pytest.raises(ConfigError, match="option 'fisher' must be one of 'expected', 'empirical'"):
        FisherMerging(fisher="sampled")


def test_fisher_merges_gpt2_whose_embeddings_check_the_padding():
    """GPT-2's embedding level refuses sequences that end with the pad token; inside Fisher's
    per-sample ``vmap`` that check cannot run (it reads the data) and is left to the whole batch."""
    pytest.importorskip("transformers")
    import neurofuse.hf as nh

    ds = nh.token_task(n_train=64, n_test=8, seed=0)
    vocab = int(ds.x_train.max()) + 1
    models = [nh.tiny_model("gpt2", ds.input_shape, ds.num_classes, seed=s, vocab_size=vocab) for s in (0, 1)]
    fused = neurofuse.fuse(models, (ds.x_train[:32], ds.y_train[:32]), method="fisher", progress=False)
    with torch.no_grad():
        assert torch.isfinite(fused(ds.x_test)).all()
