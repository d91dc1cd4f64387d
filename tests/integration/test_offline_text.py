"""Models whose text side needs Hugging Face files (open_clip's nllb / xlm-roberta / mt5 text
towers, SigLIP's tokenizers) decompose and train with the prototype head offline; the text tower
is built only when text is needed, and then the job fails in one line with exit status 2."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}
NLLB = ["model=open_clip", "model.arch=nllb-clip-base", "model.pretrained=null", "model.image_size=64"]
DATA = ["dataset.params.n_train=36", "dataset.params.n_val=12", "dataset.params.n_test=12",
        "dataset.params.n_reference=12", "trainer=fast", "logger=none", "method=base"]


def _cli(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "residual_exp", *args, f"paths.root_dir={tmp_path}",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**OFFLINE, "HF_HOME": str(tmp_path / "hf")})


def test_hf_text_tower_is_not_built_for_the_image_side(tmp_path):
    proc = _cli(tmp_path, "task=check_decomposition", *NLLB)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "OK" in proc.stdout and "Traceback" not in proc.stderr


def test_text_needed_offline_fails_in_one_line_and_prototypes_run(tmp_path):
    proc = _cli(tmp_path / "auto", *NLLB, *DATA)                          # classifier=auto: the text head
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("error: could not load the tokenizer of open_clip nllb-clip-base:")
    assert "classifier=prototype" in lines[0]
    proc = _cli(tmp_path / "proto", *NLLB, *DATA, "classifier=prototype")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "open_clip  shapes_shape  base" in proc.stdout


def test_the_text_tower_is_built_on_first_use_and_fails_clearly(monkeypatch, tmp_path):
    import huggingface_hub.constants

    from residual_exp.backbones import build_backbone
    from residual_exp.backbones.open_clip_backbone import VisionOnlyCLIP
    from residual_exp.backbones.weights import WeightsUnavailable
    from tests.unit.test_decompose_tiny import model_cfg
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    bb = build_backbone(model_cfg(name="open_clip", arch="xlm-roberta-base-ViT-B-32", pretrained=None,
                                  image_size=32, cache_dir=str(tmp_path)))
    assert isinstance(bb.model, VisionOnlyCLIP) and bb.has_text and bb.model._full is None
    with pytest.raises(WeightsUnavailable, match=r"^could not load the text tower of open_clip "
                                                 r"xlm-roberta-base-ViT-B-32: \w+") as e:
        bb.model.text_model()
    assert "\n" not in str(e.value)
