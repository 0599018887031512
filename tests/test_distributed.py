"""Fusion on torch.distributed: 2 gloo ranks on shards equal one process on the union."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import neurofuse
from neurofuse import FusionSet
from neurofuse.distributed import shard_fusion_set
from neurofuse.errors import ConfigError, DataError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, models, x, y, method: str, importance: str,
               out_dir: str, options=None) -> None:  # pragma: no cover - runs in the spawned ranks
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fused = neurofuse.fuse(models, (x, y), method=method, importance=importance, progress=False,
                               distributed=True, batch_size=64, **(options or {}))
        torch.save({k: v.clone() for k, v in fused.state_dict().items()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method,importance", [("kf-linear", "uniform"), ("otfusion", "conductance"),
                                               ("git-rebasin", "uniform")])
def test_two_gloo_ranks_give_the_fused_model_of_one_process_on_the_union(
        method, importance, dirichlet_mlps, digits_fusion, tmp_path):
    models = dirichlet_mlps[0][:2]
    x, y = digits_fusion
    ref = neurofuse.fuse(models, (x, y), method=method, importance=importance, progress=False,
                         batch_size=64)
    mp.spawn(_rank_main, args=(2, _free_port(), models, x, y, method, importance, str(tmp_path)),
             nprocs=2, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for key, v in ref.state_dict().items():
        for st in states:
            assert torch.allclose(st[key], v, atol=1e-6, rtol=0), key


def test_two_gloo_ranks_gather_the_first_level_outputs_when_the_fusion_set_is_small(
        dirichlet_mlps, digits_fusion, tmp_path):
    """60 samples <= 65 design columns: the first level's grouping runs on the outputs themselves
    (``LinearStats(rows=True)``); the ranks gather them in rank order, so 2 ranks give the
    one-process first level bit for bit.  The later levels solve from 60 rows, ill-conditioned
    enough (fitted weights ~10) that float64 sums in another order move them by ~1e-5 of their
    size, with or without kept rows: compared relative to their magnitude."""
    models = dirichlet_mlps[0][:2]
    x, y = digits_fusion[0][:60], digits_fusion[1][:60]
    ref = neurofuse.fuse(models, (x, y), method="kf-linear", importance="uniform", progress=False,
                         batch_size=64)
    mp.spawn(_rank_main, args=(2, _free_port(), models, x, y, "kf-linear", "uniform", str(tmp_path)),
             nprocs=2, join=True)
    for r in range(2):
        st = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        for key, v in ref.state_dict().items():
            if key.startswith("levels.0."):
                assert torch.equal(st[key], v), key
            else:
                assert float((st[key] - v).abs().max()) <= 1e-4 * float(v.abs().max()), key


def test_shards_cover_the_fusion_set_in_order():
    fs = FusionSet(torch.arange(10.0)[:, None], torch.arange(10), batch_size=3)
    parts = [shard_fusion_set(fs, r, 3) for r in range(3)]
    assert torch.equal(torch.cat([p.x for p in parts]), fs.x)
    assert [len(p) for p in parts] == [3, 3, 4]
    with pytest.raises(DataError, match="every rank needs one"):
        shard_fusion_set(FusionSet(torch.zeros(1, 2)), 0, 2)


def test_distributed_without_a_process_group_is_a_clear_error(dirichlet_mlps, digits_fusion):
    with pytest.raises(ConfigError, match="not initialised"):
        neurofuse.fuse(dirichlet_mlps[0][:2], digits_fusion, progress=False, distributed=True)


def test_methods_that_need_all_samples_refuse_distributed(dirichlet_mlps, digits_fusion):
    with pytest.raises(ConfigError, match="cannot run distributed.*kf-linear"):
        neurofuse.fuse(dirichlet_mlps[0][:2], digits_fusion, method="kf-gradient", progress=False,
                       distributed=True)


@pytest.mark.parametrize("method,options", [("kf-linear", {}), ("otfusion", {}), ("kf-linear", {"attention_steps": 5})])
def test_two_gloo_ranks_fuse_transformers_like_one_process(method, options, tmp_path):
    """Every statistic of the transformer closed form (stream Gram matrix, least squares, the
    per-neuron LayerNorm and position fits) and of the head-structured alignment is summed over
    the ranks, and so are the gradients of the steps on the queries and keys
    (``attention_steps``), so 2 ranks give the one-process fused ViT."""
    from neurofuse.models import make_model

    torch.manual_seed(0)
    models = [make_model("vit", "tiny", (1, 8, 8), 10).eval() for _ in range(2)]
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(96, 1, 8, 8, generator=g), torch.randint(0, 10, (96,), generator=g)
    ref = neurofuse.fuse(models, (x, y), method=method, progress=False, batch_size=64, **options)
    mp.spawn(_rank_main, args=(2, _free_port(), models, x, y, method, "uniform", str(tmp_path), options),
             nprocs=2, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    with torch.no_grad():
        want = ref(x)
        for st in states:
            got = models[0].clone()
            got.load_state_dict(st)
            # float32 sums in another order, through five stages: rounding, not another grouping (1e-1)
            assert float((got(x) - want).abs().max()) < 1e-4


def test_two_gloo_ranks_fit_a_layernorm_step_like_one_process(tmp_path):
    """A level ``Linear -> LayerNorm`` is fitted in steps: the rows' spread, the least squares and
    the LayerNorm's per-neuron lines are all summed over the ranks."""
    from .levels.user_models import MLP

    models = []
    for seed in range(2):
        torch.manual_seed(seed)
        models.append(neurofuse.levels_from(MLP().eval(), input_shape=(3, 8, 8)))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(160, 3, 8, 8, generator=g), torch.randint(0, 10, (160,), generator=g)
    ref = neurofuse.fuse(models, (x, y), method="kf-linear", progress=False, batch_size=64)
    mp.spawn(_rank_main, args=(2, _free_port(), models, x, y, "kf-linear", "uniform", str(tmp_path)),
             nprocs=2, join=True)
    with torch.no_grad():
        want = ref(x)
        for r in range(2):
            ref.load_state_dict(torch.load(tmp_path / f"rank{r}.pt", weights_only=True))
            assert float((ref(x) - want).abs().max()) < 1e-4
