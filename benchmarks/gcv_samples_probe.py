"""Probe: does generalised cross-validation that leaves out whole samples (a transformer's tokens,
a conv level's positions together) pick better ridge penalties than one that leaves out rows?

Run once per source tree (the variant is commit ``7aaecc9`` on top of ``de44aec``, reverted by the next commit),
then compare; validation accuracy only (20 % of the training data held out, as in
``transformer_fusion.py --val 0.2``):

    OMP_NUM_THREADS=1 PYTHONPATH=<tree before>/src python benchmarks/gcv_samples_probe.py run old out.jsonl
    OMP_NUM_THREADS=1 PYTHONPATH=<tree of the variant>/src python benchmarks/gcv_samples_probe.py run new out.jsonl
    python benchmarks/gcv_samples_probe.py compare out.jsonl

Families, seeds, model counts and fusion-set sizes are arguments of ``run`` (defaults: the five
transformer families of ``transformer_fusion.py`` on digits / the token task, seeds 1 2, 2 and 4
models, 32 64 128 400 fusion samples); kf-linear at every count, hf-linear at 2 models.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import transformer_fusion as tf  # noqa: E402


def run(a: argparse.Namespace) -> None:
    import neurofuse
    from neurofuse.data import balanced_subset, partition
    from neurofuse.training import TrainConfig, evaluate, train_model

    torch.set_num_threads(1)
    for fam in a.family:
        for seed in a.seeds:
            ds = tf.family_data(fam, "digits", 0, seed)
            y = ds.y_train.numpy()
            every = np.arange(len(y))
            held = balanced_subset(y, every, int(round(0.2 * len(y))), seed=10_000 + seed)
            pool = np.setdiff1d(every, held)
            val = lambda m: evaluate(m, ds.x_train[held], ds.y_train[held])["accuracy"]  # noqa: E731
            for n in a.models:
                models = []
                for i, part in enumerate(partition(y[pool], n, "dirichlet", seed=seed)):
                    part = pool[part]
                    m = tf.make(fam, ds, 1000 * seed + i)
                    train_model(m, ds.x_train[part], ds.y_train[part],
                                config=TrainConfig(epochs=30, lr=3e-3, seed=1000 * seed + i))
                    m.eval()
                    models.append(neurofuse.levels_from(m, input_shape=ds.input_shape) if fam == "encoder" else m)
                base = [val(m) for m in models]
                for size in a.sizes:
                    idx = balanced_subset(y, pool, size, seed=seed)
                    for method in (["kf-linear", "hf-linear"] if n == 2 else ["kf-linear"]):
                        c0 = time.process_time()
                        fused = neurofuse.fuse(models, (ds.x_train[idx], ds.y_train[idx]), method=method,
                                               seed=seed, progress=False)
                        r = dict(tree=a.tree, family=fam, seed=seed, n=n, size=size, method=method,
                                 val=val(fused), cpu=time.process_time() - c0, base=base)
                        print(json.dumps(r), flush=True)
                        with open(a.out, "a") as f:
                            f.write(json.dumps(r) + "\n")


def compare(a: argparse.Namespace) -> None:
    rows = [json.loads(line) for line in open(a.out)]
    d = {(r["tree"], r["family"], r["seed"], r["n"], r["size"], r["method"]): r["val"] for r in rows}
    total = collections.defaultdict(list)
    print("family N method size: old new (validation %, mean of seeds) | new - old per seed")
    for fam in sorted({r["family"] for r in rows}):
        for n in sorted({r["n"] for r in rows}):
            for m in ("kf-linear", "hf-linear"):
                for size in sorted({r["size"] for r in rows}):
                    keys = [k[1:] for k in d if k[0] == "old" and k[1] == fam and k[3:] == (n, size, m)
                            and ("new",) + k[1:] in d]
                    if not keys:
                        continue
                    old = [d[("old",) + k] for k in keys]
                    new = [d[("new",) + k] for k in keys]
                    diff = [100 * (b - o) for o, b in zip(old, new)]
                    total[(m, size)] += diff
                    print(f"{fam:8s} {n} {m} {size:4d}: {100 * np.mean(old):5.1f} {100 * np.mean(new):5.1f} | "
                          + " ".join(f"{x:+.1f}" for x in diff))
    for (m, size), v in sorted(total.items()):
        print(f"{m} {size}: mean {np.mean(v):+.2f} over {len(v)} cells, better {sum(x > 0 for x in v)}, "
              f"worse {sum(x < 0 for x in v)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("tree")
    r.add_argument("out")
    r.add_argument("--family", nargs="+", default=["encoder", "vit", "hf-vit", "hf-bert", "hf-gpt2"])
    r.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    r.add_argument("--models", type=int, nargs="+", default=[2, 4])
    r.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 400])
    r.set_defaults(func=run)
    c = sub.add_parser("compare")
    c.add_argument("out")
    c.set_defaults(func=compare)
    a = p.parse_args()
    a.func(a)


if __name__ == "__main__":
    main()
