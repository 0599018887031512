"""No loader can be made to allocate more than a small multiple of what the architecture needs.

Properties checked, each in a fresh process under an address-space limit (a regression fails
there instead of taking the machine's memory), by the growth of its peak resident memory:

* a small PyTorch zip whose storage entry is a compressed run of zeros (hundreds of MiB once
  inflated) is refused from its zip directory, by ``load_model``, ``load_state_dict``,
  ``read_state_dict`` and ``neurofuse eval``, before its data is read;
* a zip entry that claims more bytes than the file has is refused;
* a pickled "module" that calls ``nn.Linear(8000, 8000)`` instead of storing one is refused by
  ``load_pickled_module`` without allocating its weights;
* a genuine file with far more data than the architecture (a larger model's checkpoint) is
  refused before its data is read.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from neurofuse.errors import CheckpointError
from neurofuse.interop import load_pickled_module, load_state_dict, read_state_dict
from neurofuse.models import MLP

#: inflated size of the hostile storage entry (MiB): large enough to see, small enough to be safe
BOMB_MIB = 384


def _arch() -> MLP:
    torch.manual_seed(0)
    return MLP((1, 8, 8), 10, [8])


def _zip_bomb(path: Path, mib: int = BOMB_MIB) -> Path:
    """A torch.save zip of the MLP's state dict whose first weight is a view of a ``mib`` MiB
    storage, that storage's entry deflated (a few hundred KiB): the pickle and the zip directory
    both declare the full size, as in a file crafted to make the loader allocate it."""
    state = _arch().state_dict()
    first = next(iter(state))
    big = torch.empty((mib << 20) // 4)   # never written here: its pages are not touched
    state[first] = big[:state[first].numel()].view_as(state[first])
    plain = path.with_name("plain.pt")
    torch.save(state, plain)
    del big, state
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            z = zipfile.ZipInfo(info.filename)
            z.compress_type = zipfile.ZIP_DEFLATED if info.file_size > 1 << 20 else zipfile.ZIP_STORED
            with src.open(info) as fin, dst.open(z, "w", force_zip64=True) as fout:
                for chunk in iter(lambda: fin.read(1 << 20), b""):
                    fout.write(bytes(len(chunk)) if z.compress_type == zipfile.ZIP_DEFLATED else chunk)
    plain.unlink()
    assert path.stat().st_size < 4 << 20
    return path


def _run_bounded(code: str) -> dict:
    """Run ``code`` in a fresh Python under a 6 GiB address-space limit; it prints a JSON line with
    the error it met and how much its peak resident memory grew (MiB) while loading."""
    prog = textwrap.dedent("""
        import json, resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
        import torch, neurofuse, neurofuse.checkpoint, neurofuse.interop
        def rss():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        before = rss()
        try:
    """) + textwrap.indent(textwrap.dedent(code), "    ") + textwrap.dedent("""
            err = None
        except Exception as exc:
            err = type(exc).__name__ + ": " + str(exc)
        print(json.dumps({"error": err, "grew": rss() - before}))
    """)
    proc = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    return _zip_bomb(tmp_path_factory.mktemp("bomb") / "bomb.pt")


_CALLS = [
    "neurofuse.checkpoint.load_model(P, config=CFG)",
    "neurofuse.interop.load_state_dict(neurofuse.models.MLP((1, 8, 8), 10, [8]), P)",
    "neurofuse.interop.read_state_dict(P)",
    "neurofuse.checkpoint.load_model(P)",   # no architecture: the error says what the file holds
]


def test_a_compressed_storage_entry_is_refused_before_it_is_inflated(bomb):
    cfg = json.dumps(_arch().config())
    calls = "".join(f"try:\n    {c}\n    ERRS.append(None)\n"
                    f"except Exception as exc:\n    ERRS.append(type(exc).__name__ + ': ' + str(exc))\n"
                    for c in _CALLS)
    out = _run_bounded(f"P = {str(bomb)!r}; CFG = json.loads({cfg!r}); ERRS = []\n{calls}"
                       "raise RuntimeError(json.dumps(ERRS))\n")
    errors = json.loads(out["error"].split(": ", 1)[1])
    for call, err in zip(_CALLS, errors):
        assert err and err.startswith("CheckpointError") and "compressed" in err, (call, err)
    assert out["grew"] < BOMB_MIB / 4, out


def test_eval_of_a_zip_bomb_is_a_one_line_error_without_the_memory(bomb, tmp_path):
    (tmp_path / "m.pt").write_bytes(bomb.read_bytes())
    torch.save(_arch().state_dict(), tmp_path / "good.pt")
    for name in ("m", "good"):
        (tmp_path / f"{name}.pt.json").write_text(json.dumps(_arch().config()))
    code = (f"import sys, resource; from neurofuse.cli import main\n"
            f"resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))\n"
            f"assert main(['eval', {str(tmp_path / 'good.pt')!r}, '--dataset', 'digits']) == 0\n"
            f"r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024\n"
            f"rc = main(['eval', {str(tmp_path / 'm.pt')!r}, '--dataset', 'digits'])\n"
            f"print('GREW', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024 - r0)\n"
            f"sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-500:] + proc.stderr[-2000:]
    assert "compressed" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert int(proc.stdout.split("GREW")[1]) < BOMB_MIB // 4


def test_an_entry_claiming_more_bytes_than_the_file_is_refused(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(_arch().state_dict(), good)
    blob = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("/data/0"))
    # the central directory's sizes of that entry: claim 3 GiB
    pos = blob.find(b"PK\x01\x02")
    while pos != -1:
        name_len = int.from_bytes(blob[pos + 28:pos + 30], "little")
        name = bytes(blob[pos + 46:pos + 46 + name_len]).decode()
        if name == info.filename:
            blob[pos + 20:pos + 24] = (3 << 30).to_bytes(4, "little")   # compressed size
            blob[pos + 24:pos + 28] = (3 << 30).to_bytes(4, "little")   # uncompressed size
        pos = blob.find(b"PK\x01\x02", pos + 4)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(blob))
    out = _run_bounded(f"neurofuse.interop.read_state_dict({str(bad)!r})\n")
    assert out["error"] and out["error"].startswith("CheckpointError") and "corrupt" in out["error"], out
    assert out["grew"] < 256, out


def test_a_larger_models_checkpoint_is_refused_before_its_data_is_read(tmp_path):
    big = tmp_path / "big.pt"
    torch.save({"levels.0.1.weight": torch.zeros(64, 1 << 16)}, big)   # 16 MiB
    with pytest.raises(CheckpointError, match="more than the .* the architecture allows"):
        load_state_dict(_arch(), big)
    from safetensors.torch import save_file

    save_file({"levels.0.1.weight": torch.zeros(64, 1 << 16)}, str(tmp_path / "big.safetensors"))
    with pytest.raises(CheckpointError, match="more than the .* the architecture allows"):
        load_state_dict(_arch(), tmp_path / "big.safetensors")


class _Bomb:
    """Pickles as a *call* of ``nn.Linear(8000, 8000)`` (256 MB of weights when run)."""

    def __reduce__(self):
        return (nn.Linear, (8000, 8000))


def test_a_pickled_constructor_call_allocates_nothing_and_is_refused(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(_Bomb(), path)
    assert path.stat().st_size < 4096
    out = _run_bounded(f"neurofuse.interop.load_pickled_module({str(path)!r})\n")
    assert out["error"] and "builds modules by calling their classes" in out["error"], out
    assert out["grew"] < 64, out
    with pytest.raises(CheckpointError, match="calling their classes"):
        load_pickled_module(path)


def test_a_pickled_module_still_loads_whole(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    torch.save(model, tmp_path / "m.pt")
    back = load_pickled_module(tmp_path / "m.pt")
    x = torch.randn(5, 4)
    assert not any(p.is_meta for p in back.parameters())
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


@pytest.mark.parametrize("suffix", [".bin", ".ckpt", ".pth"])
def test_a_pytorch_file_is_read_by_content_whatever_its_name(tmp_path, suffix):
    model = _arch()
    path = tmp_path / f"weights{suffix}"
    torch.save(model.state_dict(), path)
    state = read_state_dict(path)
    assert set(state) == set(model.state_dict())
    from neurofuse.checkpoint import load_model

    back = load_model(path, config=model.config())
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(back(x), model.eval()(x))
