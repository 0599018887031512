"""kf-linear on MLPs with LayerNorm of width 400 against the fusion-set size, from a quarter of
the width to four times it (the size of issue 23's cliff, 400, among them): two models trained 2
epochs on the parts of a Dirichlet split of the first 20,000 MNIST training images, fusion sets
drawn class-balanced from the other 40,000, test accuracy.

    NEUROFUSE_DATA=/path/to/data PYTHONPATH=src python benchmarks/layernorm_fusion_size.py
"""
import os
import sys
import warnings

import numpy as np
import torch

import neurofuse

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "levels"))
from user_models import MLP, ResMLP  # noqa: E402

from neurofuse.data import balanced_subset, load_dataset, partition  # noqa: E402
from neurofuse.training import TrainConfig, evaluate, train_model  # noqa: E402
torch.set_num_threads(2)
ds = load_dataset("mnist")
y = ds.y_train.numpy()
parts = partition(y[:20000], 2, "dirichlet", seed=0)
for name, make in (("mlp_ln 400", lambda: MLP(784, (400, 400), 10)), ("resmlp 400", lambda: ResMLP(784, 400, 400))):
    models = []
    for i, p in enumerate(parts):
        torch.manual_seed(i); m = make()
        train_model(m, ds.x_train[p], ds.y_train[p], config=TrainConfig(epochs=2, lr=1e-3, seed=i))
        models.append(neurofuse.levels_from(m.eval(), input_shape=ds.input_shape))
    acc = lambda m: round(100 * evaluate(m, ds.x_test, ds.y_test)["accuracy"], 2)
    row = [f"bases {acc(models[0])}/{acc(models[1])}"]
    for n in (100, 200, 380, 400, 420, 800, 1600):
        idx = balanced_subset(y, np.arange(20000, 60000), n, seed=1)
        f = neurofuse.fuse(models, (ds.x_train[idx], ds.y_train[idx]), method="kf-linear", progress=False)
        row.append(f"{n}:{acc(f)}")
    print(name, " ".join(row), flush=True)
