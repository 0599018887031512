"""Stop 37's speed check: the alignments' CPU seconds on models without grouped convolutions or
GroupNorms, whose alignment the stop did not mean to change (it now lays every level out with its
grouped convolutions and asks every level output for its groups): two random torchvision-style
ResNet-18s with BatchNorm (``resnet18``; otfusion, git-rebasin on 400 samples, weight matching from
the weights) and MLPs 784-512-512-10 (``mlp``).  Run it with PYTHONPATH on the tree before the
change and on this one, alternating:

    for t in OLD NEW OLD NEW OLD NEW; do OMP_NUM_THREADS=1 PYTHONPATH=$t/src python benchmarks/stop37_speed_check.py; done

Each line prints ``model/method=CPU seconds (a checksum of the fused logits)``.
"""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "levels"))
import torch  # noqa: E402

import neurofuse  # noqa: E402
from user_models import resnet18  # noqa: E402

torch.set_num_threads(1)
MODELS = {"resnet18": ((3, 32, 32), resnet18),
          "mlp": ((1, 28, 28), lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 512), torch.nn.ReLU(),
                                                           torch.nn.Linear(512, 512), torch.nn.ReLU(),
                                                           torch.nn.Linear(512, 10)))}
row = []
for which, (shape, make) in MODELS.items():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(400, *shape, generator=g), torch.randint(0, 10, (400,), generator=g)
    nets = []
    for s in (0, 1):
        torch.manual_seed(s)
        nets.append(neurofuse.levels_from(make().eval(), input_shape=shape))
    for m in ("otfusion", "git-rebasin", "weight-matching"):
        c0 = time.process_time()
        f = neurofuse.fuse(nets, None if m == "weight-matching" else (x, y), method=m, progress=False)
        row.append(f"{which}/{m}={time.process_time() - c0:.3f} ({float(f(x[:4]).abs().sum()):.6g})")
print(" ".join(row))
