"""A before-and-after speed check: CPU seconds of fusion methods on random models whose fusion a
change did not mean to alter, one thread, 400 random fusion samples; and a checksum of the fused
logits, which must not move.  Run it with PYTHONPATH on the tree before the change and on the tree
after it, alternating, and compare the medians:

    for t in OLD NEW OLD NEW OLD NEW; do
        OMP_NUM_THREADS=1 PYTHONPATH=$t/src python benchmarks/speed_check.py --methods otfusion git-rebasin weight-matching
    done

Models (``--models``): two torchvision-style ResNet-18s with BatchNorm (``resnet18``), MLPs
784-512-512-10 (``mlp``, the one-pass path of the closed form) and MLPs with LayerNorm
(``mlp_ln``).  Stop 35 ran ``--models resnet18 mlp_ln --methods otfusion kf-linear``, stop 36
``--methods kf-linear hf-linear``, stop 37 ``--models resnet18 mlp --methods otfusion git-rebasin
weight-matching`` (weight matching reads no data).  Prints ``model/method=CPU seconds (checksum)``.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "levels"))
import ot  # noqa: E402,F401  (imported here, not inside the first timed call)
import torch  # noqa: E402

import neurofuse  # noqa: E402
from neurofuse.methods import get_method  # noqa: E402
from user_models import MLP, resnet18  # noqa: E402

MODELS = {"resnet18": ((3, 32, 32), resnet18),
          "mlp": ((1, 28, 28), lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 512), torch.nn.ReLU(),
                                                           torch.nn.Linear(512, 512), torch.nn.ReLU(),
                                                           torch.nn.Linear(512, 10))),
          "mlp_ln": ((3, 8, 8), lambda: MLP(192, (256, 256), 10))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    p.add_argument("--methods", nargs="+", default=["kf-linear", "hf-linear"])
    a = p.parse_args()
    torch.set_num_threads(1)
    row = []
    for which in a.models:
        shape, make = MODELS[which]
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(400, *shape, generator=g), torch.randint(0, 10, (400,), generator=g)
        nets = []
        for s in (0, 1):
            torch.manual_seed(s)
            nets.append(neurofuse.levels_from(make().eval(), input_shape=shape))
        for m in a.methods:
            data = (x, y) if get_method(m).needs_data else None
            c0 = time.process_time()
            f = neurofuse.fuse(nets, data, method=m, progress=False)
            row.append(f"{which}/{m}={time.process_time() - c0:.3f} ({float(f(x[:4]).abs().sum()):.6g})")
    print(" ".join(row))


if __name__ == "__main__":
    main()
