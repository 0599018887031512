"""CPU seconds of kf-linear on N zoo ViTs (``small``, random weights, 400 MNIST images) and the
floor (one forward pass of every model over the fusion set), one thread.  Compare two trees in
one run by alternating ``PYTHONPATH``:

    for r in 1 2 3; do for src in ../before/src src; do
        OMP_NUM_THREADS=1 PYTHONPATH=$src python benchmarks/vit_closed_form_time.py 4; done; done

Prints ``N kf-linear-CPU-s floor-CPU-s``.  A second argument sets kf-linear's
``attention_steps`` (gradient steps on the queries and keys; default 0).
"""
import sys, time, torch, os
import neurofuse
from neurofuse.models import make_model
from neurofuse.data import load_dataset, balanced_subset
import numpy as np
torch.set_num_threads(1)
ds = load_dataset("mnist", os.environ.get("NEUROFUSE_DATA"))
y = ds.y_train.numpy(); idx = balanced_subset(y, np.arange(len(y)), 400, seed=0)
x, yy = ds.x_train[idx], ds.y_train[idx]
n = int(sys.argv[1]); steps = int(sys.argv[2]) if len(sys.argv) > 2 else 0; models = []
for s in range(n):
    torch.manual_seed(s); models.append(make_model("vit", "small", (1, 28, 28), 10).eval())
neurofuse.fuse(models[:2], (x[:64], yy[:64]), method="kf-linear", progress=False)  # warm-up
opts = {"attention_steps": steps} if steps else {}
c0 = time.process_time(); neurofuse.fuse(models, (x, yy), method="kf-linear", progress=False, **opts)
t = time.process_time() - c0
c0 = time.process_time()
with torch.no_grad():
    for m in models:
        for lo in range(0, 400, 256): m(x[lo:lo + 256])
floor = time.process_time() - c0
print(f"{n} {t:.2f} {floor:.2f}")
