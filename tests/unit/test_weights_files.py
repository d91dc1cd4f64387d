"""model.weights files that are not the weights of the chosen model: one line naming the file and why.

Real files in the formats people pass by mistake: an empty file, a text file, a plain Python pickle, a pickle
whose loading would run code (it must never run), a pickled nn.Module, a bare tensor, a training checkpoint
without weights, damaged zip and safetensors files, and state dicts of another architecture.
"""
from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from residual_exp.backbones import build_backbone
from residual_exp.backbones.weights import BadWeightsFile, WeightsUnavailable, load_weights_file
from residual_exp.config import ModelConfig

ROOT = Path(__file__).resolve().parents[2]


class _RunsCode:
    """Unpickling this would create a file: a pickle that must be refused unread."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _files(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name → (file, a phrase its refusal must contain)."""
    f = {}

    def put(name, data: bytes, reason: str):
        (tmp / name).write_bytes(data)
        f[name] = (tmp / name, reason)
    put("empty.pt", b"", "empty file (0 bytes)")
    put("notes.txt", b"hello, these are not weights\n", "not a weights file")
    put("plain.pkl", pickle.dumps({"layer": [1.0, 2.0]}), "unsafe or foreign pickle refused")
    put("runs_code.pt", pickle.dumps(_RunsCode(tmp / "EXECUTED")), "nothing in the file was executed")
    buf = io.BytesIO()
    torch.save(torch.nn.Linear(2, 2), buf)
    put("module.pt", buf.getvalue(), "unsafe pickle refused: it needs the Python object torch.nn.modules.linear.Linear")
    buf = io.BytesIO()
    torch.save(torch.zeros(3), buf)
    put("tensor.pt", buf.getvalue(), "not a state dict: the file holds a Tensor")
    buf = io.BytesIO()
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, buf)
    put("checkpoint.pt", buf.getvalue(), "not a state dict: 2 of its 2 entries are not tensors")
    buf = io.BytesIO()
    torch.save({}, buf)
    put("emptydict.pt", buf.getvalue(), "an empty state dict")
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(1000)}, buf)
    put("truncated.pt", buf.getvalue()[:300], "damaged torch checkpoint")
    save_file({"w": torch.zeros(8)}, str(tmp / "ok.safetensors"))
    put("truncated.safetensors", (tmp / "ok.safetensors").read_bytes()[:-4], "damaged safetensors file")
    put("fake.safetensors", b"not safetensors at all", "not a safetensors file")
    return f


def test_every_kind_of_bad_file_is_named_with_its_reason(tmp_path):
    for name, (path, reason) in _files(tmp_path).items():
        with pytest.raises(BadWeightsFile) as e:
            load_weights_file(path)
        msg = str(e.value)
        assert msg.startswith(f"model.weights={path}: ") and reason in msg, (name, msg)
        assert "\n" not in msg and isinstance(e.value, WeightsUnavailable)     # a user error: one line, exit 2
    assert not (tmp_path / "EXECUTED").exists()                                 # the pickle's payload never ran


def test_state_dicts_are_unwrapped(tmp_path):
    w = {"a.weight": torch.randn(2, 3), "a.bias": torch.randn(2)}
    for i, obj in enumerate([w, {"state_dict": w}, {"model": w, "epoch": 3}, {f"module.{k}": v for k, v in w.items()}]):
        torch.save(obj, tmp_path / f"{i}.pt")
        got = load_weights_file(tmp_path / f"{i}.pt")
        assert got.keys() == w.keys() and all(torch.equal(got[k], w[k]) for k in w)
    save_file(w, str(tmp_path / "w.safetensors"))
    got = load_weights_file(tmp_path / "w.safetensors")
    assert all(torch.equal(got[k], w[k]) for k in w)


def _tiny_clip(weights=None):
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(ROOT / "residual_exp/conf/model/tiny_clip.yaml"),
                          {"weights": str(weights) if weights else None})
    return build_backbone(cfg)


def test_tiny_clip_reads_its_own_state_dict_from_a_torch_file_and_refuses_another_architecture(tmp_path):
    bb = _tiny_clip()
    torch.save(bb.model.state_dict(), tmp_path / "own.pt")
    again = _tiny_clip(tmp_path / "own.pt")
    assert all(torch.equal(a, b) for a, b in zip(bb.model.state_dict().values(), again.model.state_dict().values()))
    sd = dict(bb.model.state_dict())
    sd["positional_embedding"] = torch.zeros(5, 3)                             # another shape
    sd.pop("text_projection")                                                  # missing
    sd["extra.weight"] = torch.zeros(1)                                        # unexpected
    torch.save(sd, tmp_path / "other.pt")
    with pytest.raises(BadWeightsFile) as e:
        _tiny_clip(tmp_path / "other.pt")
    msg = str(e.value)
    assert "wrong architecture" in msg and "1 parameter of the model missing (e.g. text_projection)" in msg
    assert "1 unexpected (e.g. extra.weight)" in msg and "positional_embedding: file [5, 3] vs model" in msg


def test_timm_and_open_clip_refuse_weights_of_another_architecture(tmp_path):
    from residual_exp.backbones.timm_backbone import create_timm
    small = create_timm("vit_tiny_patch16_224", None, None, 32, params={"create_kwargs": {"depth": 1}})
    torch.save(small.state_dict(), tmp_path / "depth1.pt")
    with pytest.raises(BadWeightsFile, match=r"depth1.pt: wrong architecture: not the weights of timm "
                                             r"vit_tiny_patch16_224: \d+ parameters of the model missing \(e.g. blocks.1"):
        create_timm("vit_tiny_patch16_224", None, str(tmp_path / "depth1.pt"), 32,
                    params={"create_kwargs": {"depth": 2}})
    pytest.importorskip("open_clip")
    from residual_exp.backbones.open_clip_backbone import create_open_clip
    with pytest.raises(BadWeightsFile, match=r"depth1.pt: wrong architecture: not the weights of open_clip ViT-B-32"):
        create_open_clip("ViT-B-32", None, str(tmp_path / "depth1.pt"), 64, None)
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(BadWeightsFile, match="empty file"):
        create_open_clip("ViT-B-32", None, str(tmp_path / "empty.bin"), 64, None)


@pytest.mark.parametrize("name", ["empty.pt", "runs_code.pt", "module.pt", "checkpoint.pt"])
def test_cli_refuses_bad_weights_in_one_line(tmp_path, name):
    path, reason = _files(tmp_path)[name]
    proc = subprocess.run([sys.executable, "-m", "residual_exp", "task=check_decomposition", f"model.weights={path}",
                           f"paths.root_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert errors == [f"error: model.weights={path}: " + errors[0].split(": ", 2)[2]] and reason in errors[0]
    assert "Traceback" not in proc.stderr + proc.stdout and not (tmp_path / "EXECUTED").exists()
