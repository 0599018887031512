"""Fuzzing federated benchmark configs (``neurofuse federate --bench FILE.json``).

Properties checked: any mutation of the shipped ``fl.json`` (a key removed, a value of another
type or out of range, a nested section replaced) loads into a config whose every cell builds,
or raises one ``ConfigError`` line naming the key, before anything is written or any client
starts; the CLI says it in one ``neurofuse: error:`` line.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("flwr", reason="neurofuse[federated] (flwr) is not installed")

from neurofuse.cli import main  # noqa: E402
from neurofuse.errors import ConfigError  # noqa: E402
from neurofuse.federated._bench import FL_CONFIGS, _cells, load_fl_config  # noqa: E402

_DOC = json.loads((FL_CONFIGS / "fl.json").read_text())
_PATHS = ["common", "scales", "name", "common.clients", "common.arch", "common.size", "common.server_samples",
          "common.lr", "common.seed", "common.one_shot", "common.one_shot.method", "common.one_shot.compare",
          "common.multi_round", "common.multi_round.rounds", "common.multi_round.local_epochs",
          "common.multi_round.method", "scales.smoke", "scales.smoke.dataset", "scales.smoke.alphas",
          "scales.smoke.epochs", "common.extra"]
_value = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**9), st.floats(allow_nan=True),
                   st.sampled_from(["abc", "", "kf-linear", "nope@clients", "digits", "mlp"]),
                   st.lists(st.one_of(st.integers(-1, 3), st.floats(-1, 2), st.text(max_size=3)), max_size=3),
                   st.dictionaries(st.sampled_from(["method", "rounds", "x"]), st.integers(-1, 3), max_size=2))


def _mutate(doc, path, value):
    keys = path.split(".")
    d = doc
    for k in keys[:-1]:
        if not isinstance(d, dict) or k not in d:
            return doc
        d = d[k]
    if isinstance(d, dict):
        if value is KeyError:
            d.pop(keys[-1], None)
        else:
            d[keys[-1]] = value
    return doc


@given(st.lists(st.tuples(st.sampled_from(_PATHS), st.one_of(_value, st.just(KeyError))), min_size=1,
                max_size=3))
def test_a_mutated_federated_config_builds_or_names_the_key(edits):
    doc = copy.deepcopy(_DOC)
    for path, value in edits:
        doc = _mutate(doc, path, value)
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "cfg.json"
        f.write_text(json.dumps(doc, allow_nan=True))
        try:
            cfg = load_fl_config(str(f), "smoke")
            cells = _cells(cfg, "local", None, None, ("one_shot", "multi_round"))
        except ConfigError as exc:
            msg = str(exc)
            assert "\n" not in msg and msg.startswith(("cfg.json", "benchmark", "cannot read")), msg
        else:
            assert cells and all(fc.clients.num_clients == cfg["clients"] for _, fc in cells)
            return   # a valid config would run the benchmark: the CLI is exercised on errors only
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code = main(["federate", "--bench", str(f), "--scale", "smoke", "--out", str(Path(d) / "o")])
        text = err.getvalue()
        assert code == 2 and len(text.strip().splitlines()) == 1 and text.startswith("neurofuse: error:"), text
        assert not (Path(d) / "o").exists()
