"""Fusion-set sizes around the width for MLPs with GroupNorm (Linear -> GroupNorm(4) -> ReLU,
784-400-400-10, written the usual way): 2 models on Dirichlet halves of 20,000 MNIST training
images, 3 epochs; accuracy on 10,000 held-out training images; kf-linear and hf-linear, defaults.

    NEUROFUSE_DATA=/path/to/data OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/groupnorm_fusion_size.py
"""
import time, numpy as np, torch
from torch import nn
import neurofuse
from neurofuse.data import balanced_subset, load_dataset, partition
from neurofuse.training import TrainConfig, evaluate, train_model
torch.set_num_threads(1)
class GNMLP(nn.Module):   # written the usual way: Linear -> GroupNorm(4) -> ReLU, width 400
    def __init__(s, w=400):
        super().__init__()
        s.f1, s.g1, s.f2, s.g2, s.out = nn.Linear(784, w), nn.GroupNorm(4, w), nn.Linear(w, w), nn.GroupNorm(4, w), nn.Linear(w, 10)
    def forward(s, x):
        h = torch.relu(s.g1(s.f1(x.flatten(1))))
        return s.out(torch.relu(s.g2(s.f2(h))))
ds = load_dataset("mnist")
rng = np.random.default_rng(1); perm = rng.permutation(len(ds.y_train)); val, tr = perm[:10000], perm[10000:30000]
parts = partition(ds.y_train[tr].numpy(), 2, "dirichlet", seed=0)
ms = []
for i, p in enumerate(parts):
    torch.manual_seed(i); m = GNMLP(); train_model(m, ds.x_train[tr[p]], ds.y_train[tr[p]], config=TrainConfig(epochs=3, lr=1e-3, batch_size=128, warmup_epochs=0, seed=i)); ms.append(m.eval())
acc = lambda m: round(100 * evaluate(m, ds.x_train[val], ds.y_train[val])["accuracy"], 2)
print("bases (validation)", [acc(m) for m in ms], flush=True)
nets = [neurofuse.levels_from(m, input_shape=ds.input_shape) for m in ms]
for n in (100, 380, 400, 420, 800, 1600):
    idx = balanced_subset(ds.y_train.numpy(), tr, n, seed=0)
    row = []
    for meth in ("kf-linear", "hf-linear"):
        c0 = time.process_time(); f = neurofuse.fuse(nets, (ds.x_train[idx], ds.y_train[idx]), method=meth, progress=False)
        row.append(f"{meth} {acc(f)} ({time.process_time() - c0:.1f}s)")
    print(n, " | ".join(row), flush=True)
