"""The level stream carries level inputs forward: the same values in memory, on disk or
recomputed, each level run once per batch, and nothing left behind."""

import glob
import os
import tempfile

import pytest
import torch
from torch import nn

from neurofuse import FusionSet
from neurofuse.errors import ConfigError
from neurofuse.levels import LevelStream


class _Counting(nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.rows = 0

    def forward(self, x):
        self.rows += x.shape[0]
        return x * self.scale + 1.0


def _data(n=23, bs=5):
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(0))
    return FusionSet(x, torch.arange(n) % 2, batch_size=bs)


def _walk(stream, levels, keep):
    for lvl in levels:
        if keep:
            for b in stream:
                b.keep(0, lvl(b.inputs[0]))
        stream.advance({0: lvl})
    return torch.cat([b.inputs[0] for b in stream])


@pytest.mark.parametrize("budget,spill", [(None, "disk"), (0, "disk"), (0, "recompute"), (200, "disk")])
@pytest.mark.parametrize("keep", [True, False])
def test_every_storage_gives_the_composed_levels(budget, spill, keep):
    data = _data()
    levels = [_Counting(2.0), _Counting(-0.5), _Counting(3.0)]
    with LevelStream(data, 1, memory_budget=budget, spill=spill) as st:
        got = _walk(st, levels, keep)
    want = data.x
    for lvl in levels:
        want = want * lvl.scale + 1.0
    assert torch.allclose(got, want)


def test_kept_values_are_not_computed_again():
    data = _data()
    levels = [_Counting(2.0), _Counting(3.0)]
    with LevelStream(data, 1) as st:
        _walk(st, levels, keep=True)
    assert [lvl.rows for lvl in levels] == [len(data), len(data)]  # one pass per level


def test_labels_and_several_streams_advance_independently():
    data = _data()
    with LevelStream(data, 2) as st:
        st.advance({1: _Counting(2.0)})
        b = next(iter(st))
        assert torch.equal(b.inputs[0], data.x[:5])
        assert torch.allclose(b.inputs[1], data.x[:5] * 2 + 1)
        assert torch.equal(b.y, data.y[:5])


def test_a_spilled_level_with_one_by_one_maps_in_channels_last_comes_back():
    """A [B, C, 1, 1] output in channels_last is contiguous with a last stride of C (VGG's last
    conv block at 1/8 width); spilling it to disk must not trip over the byte view."""
    x = torch.randn(12, 8, 1, 1, generator=torch.Generator().manual_seed(1))
    data = FusionSet(x, torch.arange(12) % 2, batch_size=5)

    class _ChannelsLast(nn.Module):
        def forward(self, t):
            return (2.0 * t).to(memory_format=torch.channels_last)

    with LevelStream(data, 1, memory_budget=0, spill="disk") as st:
        for b in st:
            b.keep(0, _ChannelsLast()(b.inputs[0]))
        st.advance({0: _ChannelsLast()})
        assert st.spilled == 1
        got = torch.cat([b.inputs[0] for b in st])
    assert torch.equal(got, 2.0 * x)


def test_spilled_levels_live_in_a_private_folder_that_is_removed():
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "neurofuse-stream-*")))
    data = _data()
    st = LevelStream(data, 1, memory_budget=0)
    st.advance({0: _Counting(2.0)})
    assert st.spilled == 1
    new = set(glob.glob(os.path.join(tempfile.gettempdir(), "neurofuse-stream-*"))) - before
    assert len(new) == 1 and os.listdir(new.pop())
    st.close()
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "neurofuse-stream-*"))) == before


def test_bad_settings_are_clear_errors():
    with pytest.raises(ConfigError, match="spill"):
        LevelStream(_data(), 1, spill="cloud")
    with pytest.raises(ConfigError, match="memory_budget"):
        LevelStream(_data(), 1, memory_budget=-1)
    with LevelStream(_data(), 1) as st, pytest.raises(ValueError, match="not every batch was kept"):
        st.advance({0: None})


def test_a_mapped_level_that_does_not_fit_next_to_the_kept_one_is_spilled():
    """``advance(..., transforms=...)`` holds the kept level and its mapped copy at once: within
    ``memory_budget`` the copy is kept in memory only if both fit, else it goes to disk (it used
    to be kept in memory whatever its size: otfusion reached 6 GiB on 40,000 VGG samples)."""
    data = _data()                                   # 23 rows of 3 float32: 276 bytes a level
    level, mapping = _Counting(2.0), (lambda z: z * -1.0)
    with LevelStream(data, 1, memory_budget=400, spill="disk") as st:
        for b in st:
            b.keep(0, level(b.inputs[0]))            # 276 bytes: fits
        st.advance({0: level}, transforms={0: mapping})   # 276 + 276 > 400: the copy spills
        assert st.spilled == 1
        got = torch.cat([b.inputs[0] for b in st])
    assert torch.allclose(got, -(data.x * 2.0 + 1.0))
    with LevelStream(data, 1, memory_budget=600, spill="disk") as st:   # both fit: no spill
        for b in st:
            b.keep(0, level(b.inputs[0]))
        st.advance({0: level}, transforms={0: mapping})
        assert st.spilled == 0
        assert torch.allclose(torch.cat([b.inputs[0] for b in st]), -(data.x * 2.0 + 1.0))
