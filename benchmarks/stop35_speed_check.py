"""Stop 35's speed check: otfusion and kf-linear CPU seconds on two random torchvision-style
ResNet-18s (``resnet18``) or MLPs with LayerNorm (``mlp_ln``), 400 fusion samples, one thread.
Run it with PYTHONPATH on the tree before the change and on this one, alternating:

    for t in OLD NEW; do OMP_NUM_THREADS=1 PYTHONPATH=$t/src python benchmarks/stop35_speed_check.py resnet18; done
"""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "levels"))
import torch  # noqa: E402

import neurofuse  # noqa: E402
from user_models import MLP, resnet18  # noqa: E402

torch.set_num_threads(1)
which = sys.argv[1] if len(sys.argv) > 1 else "resnet18"
g = torch.Generator().manual_seed(0)
if which == "resnet18":
    shape, make = (3, 32, 32), resnet18
else:
    shape, make = (3, 8, 8), (lambda: MLP(192, (256, 256), 10))
x, y = torch.randn(400, *shape, generator=g), torch.randint(0, 10, (400,), generator=g)
nets = []
for s in (0, 1):
    torch.manual_seed(s)
    nets.append(neurofuse.levels_from(make().eval(), input_shape=shape))
out = []
for m in ("otfusion", "kf-linear"):
    c0 = time.process_time()
    f = neurofuse.fuse(nets, (x, y), method=m, progress=False)
    out.append(f"{m}={time.process_time() - c0:.3f}")
print(which, " ".join(out), "logits", float(f(x[:4]).abs().sum()))
