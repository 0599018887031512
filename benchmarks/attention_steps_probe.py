"""Probe (stop 35): fewer ``attention_steps`` with a larger step size, on validation only.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/attention_steps_probe.py out.json hf-bert,vit,hf-gpt2
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/attention_steps_probe.py out2.json encoder,hf-vit

The protocol of ``transformer_fusion.py --val 0.2`` (seeds 1-3, 2 and 4 models): kf-linear without
steps, with 20 and 10 steps at the shipped step size (1 % of the queries' and keys' RMS), 10 at
twice and 5 at four times that size (the size is patched in here: it is no option), and
kf-gradient; validation accuracy and CPU seconds.  Record:
``benchmarks/transformers/attention-steps-fewer.json``; docs/results.md says what it showed.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402

import neurofuse  # noqa: E402
import neurofuse.methods._blockfit as bf  # noqa: E402
import transformer_fusion as tf  # noqa: E402

FACTOR = [1.0]
_Real = bf._MaskedAdam


class Scaled(_Real):
    def __init__(self, params, masks, lr, **kw):
        super().__init__(params, masks, lr=lr * FACTOR[0], **kw)


bf._MaskedAdam = Scaled
_fuse = neurofuse.fuse


def fuse(*a, _lr=1.0, **kw):
    FACTOR[0] = _lr
    try:
        return _fuse(*a, **kw)
    finally:
        FACTOR[0] = 1.0


tf.neurofuse = type("NF", (), {"fuse": staticmethod(fuse), "levels_from": staticmethod(neurofuse.levels_from)})
TABLE = [("kf-linear", "kf-linear", {}),
         ("att20", "kf-linear", {"attention_steps": 20}),
         ("att10", "kf-linear", {"attention_steps": 10}),
         ("att10-lr2", "kf-linear", {"attention_steps": 10, "_lr": 2.0}),
         ("att5-lr4", "kf-linear", {"attention_steps": 5, "_lr": 4.0}),
         ("kf-gradient", "kf-gradient", {})]
out = sys.argv[1]
fams = sys.argv[2].split(",")
rows = []
torch.set_num_threads(1)
for fam in fams:
    for n in (2, 4):
        for seed in (1, 2, 3):
            r = tf.run(fam, "digits", 5000, n, seed, 30, 3e-3, 400, [t[0] for t in TABLE], None, TABLE, 0.2)
            rows.append(r)
            print(fam, n, seed, " ".join(f"{t[0]}={r[t[0] + '_val']:.3f}/{r[t[0] + '_cpu_s']:.2f}" for t in TABLE), flush=True)
            with open(out, "w") as f:
                json.dump(rows, f, indent=1)
