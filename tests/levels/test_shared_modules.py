"""A module applied twice (or two modules sharing weights) is never cut into two levels.

Fusion fits every level on its own: two levels holding one tensor each overwrite it, and the
fused model computes neither (it fused to chance, 10.6 % against bases of 95 %, with exit 0).
Properties checked: automatic levels (``torch.fx`` and the forward-hook fallback), declared
levels, ``neurofuse levels`` and ``fuse --model-factory`` refuse such a model naming the module;
a module used twice *inside* one level is fine.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neurofuse.cli import main
from neurofuse.errors import ConfigError
from neurofuse.levels import auto_levels, levels_from


class Twice(nn.Module):
    """``fc1 -> mid -> mid -> fc3``: one module, two places."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.mid, self.fc3 = nn.Linear(64, 32), nn.Linear(32, 32), nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.relu(self.mid(x))
        x = F.relu(self.mid(x))
        return self.fc3(x)


class TwiceUntraceable(Twice):
    def forward(self, x):
        if x.sum() > 1e30:   # data-dependent: torch.fx cannot trace it, forward hooks are used
            return x
        return self.fc3(self.relu2(self.mid(self.relu1(self.mid(self.relu0(self.fc1(self.flat(x))))))))

    def __init__(self) -> None:
        super().__init__()
        self.flat, self.relu0, self.relu1, self.relu2 = nn.Flatten(), nn.ReLU(), nn.ReLU(), nn.ReLU()


class TiedWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.a, self.b, self.out = (nn.Linear(64, 16), nn.Linear(16, 16), nn.Linear(16, 16),
                                              nn.Linear(16, 10))
        self.b.weight = self.a.weight

    def forward(self, x):
        x = F.relu(self.fc1(x.flatten(1)))
        return self.out(F.relu(self.b(F.relu(self.a(x)))))


class TwiceInOneLevel(nn.Module):
    """A shared projection applied twice within one residual level: allowed."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.proj, self.out = nn.Linear(64, 16), nn.Linear(16, 16), nn.Linear(16, 10)

    def forward(self, x):
        h = self.fc1(x.flatten(1))
        h = h + self.proj(F.relu(self.proj(h)))
        return self.out(F.relu(h))


@pytest.mark.parametrize("cls,module", [(Twice, "'mid'"), (TwiceUntraceable, "'mid'"), (TiedWeights, "'a'")])
def test_automatic_levels_refuse_a_module_used_by_two_levels(cls, module):
    with pytest.raises(ConfigError) as exc:
        auto_levels(cls(), (1, 8, 8))
    msg = str(exc.value)
    assert f"module {module}" in msg and "used by levels" in msg and "\n" not in msg


def test_declared_levels_refuse_a_module_in_two_levels():
    m = Twice()
    with pytest.raises(ConfigError, match=r"module 'mid' .* used by levels 1 and 2"):
        levels_from(m, levels=[[nn.Flatten(), m.fc1], [nn.ReLU(), m.mid], [nn.ReLU(), m.mid],
                               [nn.ReLU(), m.fc3]], input_shape=(1, 8, 8))


def test_a_module_used_twice_inside_one_level_is_fine():
    model = TwiceInOneLevel().eval()
    net = auto_levels(model, (1, 8, 8))
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(net(x), model(x), atol=1e-6)


def test_cli_levels_and_fuse_refuse_it_in_one_line(tmp_path, capsys):
    src = tmp_path / "twice.py"
    src.write_text("import torch.nn.functional as F\nfrom torch import nn\n"
                   "class Twice(nn.Module):\n"
                   "    def __init__(self):\n"
                   "        super().__init__()\n"
                   "        self.fc1, self.mid, self.fc3 = nn.Linear(64, 32), nn.Linear(32, 32), nn.Linear(32, 10)\n"
                   "    def forward(self, x):\n"
                   "        x = F.relu(self.fc1(x.flatten(1)))\n"
                   "        return self.fc3(F.relu(self.mid(F.relu(self.mid(x)))))\n"
                   "def make():\n    return Twice()\n")
    assert main(["levels", f"{src}:make", "--input-shape", "1,8,8"]) == 2
    err = capsys.readouterr().err
    assert "module 'mid'" in err and len(err.strip().splitlines()) == 1
    for i in range(2):
        torch.manual_seed(i)
        from safetensors.torch import save_file

        m = Twice()
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / f"m{i}.safetensors"))
    rc = main(["fuse", str(tmp_path / "m0.safetensors"), str(tmp_path / "m1.safetensors"), "--model-factory",
               f"{src}:make", "--dataset", "digits", "--out", str(tmp_path / "f.safetensors"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "module 'mid'" in err and not (tmp_path / "f.safetensors").exists()
