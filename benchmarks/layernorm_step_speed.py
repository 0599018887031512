"""kf-linear CPU seconds on an MLP with a LayerNorm after each hidden Linear against the same MLP
without it (784-512-512-10, 2 random models, 2,000 fusion rows; one thread, alternating, 5 pairs
each): what the LayerNorm step's second pass costs.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/layernorm_step_speed.py
"""
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import neurofuse

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "levels"))
from user_models import MLP  # noqa: E402


class Plain(nn.Module):
    """The same MLP without LayerNorm and Dropout."""

    def __init__(self, hidden):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(784, hidden[0]), nn.Linear(hidden[0], hidden[1]), nn.Linear(hidden[1], 10)
    def forward(self, x):
        x = torch.flatten(x, 1)
        return self.out(F.relu(self.fc2(F.relu(self.fc1(x)))))



torch.set_num_threads(1)
hidden = (512, 512)
g = torch.Generator().manual_seed(0)
x, y = torch.randn(2000, 1, 28, 28, generator=g), torch.randint(0, 10, (2000,), generator=g)
times = {"ln": [], "plain": []}
for rep in range(5):
    for name, make in (("ln", lambda: MLP(784, hidden, 10)), ("plain", lambda: Plain(hidden))):
        nets = []
        for s in range(2):
            torch.manual_seed(100 * rep + s)
            nets.append(neurofuse.levels_from(make().eval(), input_shape=(1, 28, 28)))
        c0 = time.process_time()
        neurofuse.fuse(nets, (x, y), method="kf-linear", progress=False)
        times[name].append(time.process_time() - c0)
m = {k: statistics.median(v) for k, v in times.items()}
print({k: [round(t, 2) for t in v] for k, v in times.items()})
print(f"median CPU s: with LayerNorm {m['ln']:.2f}, without {m['plain']:.2f}, ratio {m['ln'] / m['plain']:.2f}")
