"""train → export → load in a fresh process → the training-time logits; predict and evaluate.

The reference is the training module itself (adapter + frozen head, the best-val checkpoint
loaded, backbone in the loop) — not the export code.  Exports are rebuilt by
``residual_exp.load_adapted`` in a separate Python process that sees only the export folder.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from tests.conftest import ROOT, compose_cfg

METHODS = ["base", "linear_adapter", "spectral_adapter", "finetune", "residual_coarse", "residual_fine",
           "residual_full"]
TINY = ["dataset.params.n_train=96", "dataset.params.n_val=48", "dataset.params.n_test=32",
        "dataset.params.n_reference=96", "trainer=fast", "trainer.max_epochs=2", "logger=none"]


def _train(tmp: Path, method: str, *extra: str):
    from residual_exp.run import run
    cfg = compose_cfg([*TINY, f"method={method}", *extra], tmp)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp / f"run-{method}")
    assert run(cfg) == 0
    return cfg, Path(cfg.paths.output_dir)


def _export(cfg, run_dir: Path) -> Path:
    from residual_exp.tasks.export import export
    out = run_dir.parent / f"export-{run_dir.name}"
    ecfg = compose_cfg(["task=export", f"run_dir={run_dir}", f"out={out}"])
    assert export(ecfg) == 0
    return out


def reference_module(cfg, run_dir: Path, dtype=torch.float32):
    """The training-time model: the run's adapter and head with its best checkpoint."""
    from residual_exp.data.registry import build_split
    from residual_exp.decompose.selection import select
    from residual_exp.methods import build_adapter, needs_bases
    from residual_exp.pipeline import Session
    from residual_exp.train.data import Feed
    from residual_exp.train.module import AdapterModule
    s = Session.open(cfg, progress=False)
    s.backbone.to(dtype)                        # before the readout maps are taken from it (held outside submodules)
    split = build_split(cfg.dataset, "test", s.backbone.transform)
    head = s.classifier(cfg.dataset, split.classnames, split.templates)
    ub, ob = s.reference_bases() if needs_bases(cfg.method) else (None, None)
    adapter = build_adapter(cfg.method, s.source, s.backbone.output_dim, ub, ob, backbone=s.backbone, seed=cfg.seed,
                            evr_rule=cfg.conventions.evr_rule, compat=cfg.compat,
                            units=select(cfg.units, s.backbone.layout, cfg.model.name), rank=cfg.rank)
    module = AdapterModule(adapter, head, cfg.method.lr, feed=Feed.from_images(adapter, s.backbone, s.layout))
    if cfg.method.name != "base":
        state = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
    return module.to(dtype).eval(), split


@torch.no_grad()
def reference_logits(module, split):
    from residual_exp.train.data import ImageItems, batches
    out = []
    for b in batches(ImageItems(split), 16, False):
        out.append(module(b))
    return torch.cat(out)


FRESH = r"""
import json, sys, torch
import residual_exp
images = torch.load(sys.argv[1])
out = {}
for d in json.loads(sys.argv[2]):
    m = residual_exp.load_adapted(d)
    assert not any(k.startswith("units") for k in m.state_dict())
    out[d] = m(images)
torch.save(out, sys.argv[3])
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    runs = {m: _train(tmp, m) for m in METHODS}
    exports = {m: _export(*runs[m]) for m in METHODS}
    return tmp, runs, exports


def test_every_method_exports_the_training_time_logits_in_a_fresh_process(trained):
    tmp, runs, exports = trained
    refs, images = {}, None
    for m in METHODS:
        module, split = reference_module(*runs[m])
        refs[m] = reference_logits(module, split)
        images = torch.stack([split[i][0] for i in range(len(split))]) if images is None else images
    torch.save(images, tmp / "images.pt")
    proc = subprocess.run([sys.executable, "-c", FRESH, str(tmp / "images.pt"),
                           json.dumps([str(exports[m]) for m in METHODS]), str(tmp / "logits.pt")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp / "logits.pt")
    for m in METHODS:
        logits = got[str(exports[m])]
        assert logits.shape == refs[m].shape == (32, 6), m                        # 6 shapes
        scale = refs[m].abs().max()
        print(f"{m}: max |exported − training-time logit| = {float((logits - refs[m]).abs().max()):.2e} "
              f"(/ max |logit| {float(scale):.1f} = {float((logits - refs[m]).abs().max() / scale):.2e})")
        assert ((logits - refs[m]).abs().max() / scale) <= 1e-5, (m, float((logits - refs[m]).abs().max()))
        cfg = json.loads((exports[m] / "adapted.json").read_text())
        result = next(r for r in json.loads((runs[m][1] / "results.json").read_text()) if r["method"] == m)
        assert cfg["provenance"]["test_accuracy"] == result["test_accuracy"] and cfg["method"] == m
    assert (exports["finetune"] / "backbone.safetensors").is_file()          # the tuned tower is in the folder


@pytest.mark.parametrize("method", ["residual_fine", "residual_full", "residual_coarse"])
def test_fold_is_exact_in_float64(trained, method):
    from residual_exp.export import AdaptedModel
    tmp, runs, _ = trained
    cfg, run_dir = runs[method]
    module, split = reference_module(cfg, run_dir, torch.float64)
    state = {k[len("adapter."):]: v.double() for k, v in module.state_dict().items() if k.startswith("adapter.")}
    bb = module.feed.backbone                                 # the frozen backbone, in float64
    folded = type(module.adapter).fold(state, bb.readout(), cfg.method, cfg.cache.layout, "none")
    head = module.head
    model = AdaptedModel(bb, folded, head.weight.double(), head.scale, False, split.classnames, {}).eval()
    images = torch.stack([split[i][0] for i in range(len(split))]).double()
    want = reference_logits(module, split)
    rel = float((model(images) - want).abs().max() / want.abs().max())
    print(f"{method} float64 fold: {rel:.2e}")
    assert rel <= 1e-10


TIMM_TINY = ["model=timm", "model.arch=vit_tiny_patch16_224", "model.pretrained=null", "model.image_size=32",
             "+model.params.create_kwargs.depth=2"]
ARCHS = {"open_clip": ["model=open_clip", "model.arch=ViT-B-32", "model.pretrained=null", "model.image_size=64"],
         "timm": TIMM_TINY,
         # SigLIP's readout: attention pooling (MAP) over the patch tokens, no class token
         "timm_map_siglip_like": [*TIMM_TINY, "+model.params.create_kwargs.global_pool=map",
                                  "+model.params.create_kwargs.class_token=false"],
         # SigLIP-gap / so150m: the final norm on every token, then their mean
         "timm_gap": [*TIMM_TINY, "+model.params.create_kwargs.global_pool=avg", "+model.params.create_kwargs.fc_norm=false"]}
SMALL = ["dataset.params.n_train=48", "dataset.params.n_val=24", "dataset.params.n_test=16",
         "dataset.params.n_reference=48", "trainer.max_epochs=1"]


@pytest.mark.parametrize("family", list(ARCHS))
@pytest.mark.parametrize("method", ["residual_fine", "residual_full"])
def test_random_weight_architectures_export_exactly(tmp_path, family, method):
    model = ARCHS[family]
    if family == "open_clip":
        pytest.importorskip("open_clip")
    cfg, run_dir = _train(tmp_path, method, *model, *SMALL)
    out = _export(cfg, run_dir)
    module, split = reference_module(cfg, run_dir)
    want = reference_logits(module, split)
    from residual_exp.export import load_adapted
    images = torch.stack([split[i][0] for i in range(len(split))])
    got = load_adapted(out)(images)
    rel = float((got - want).abs().max() / want.abs().max())
    print(f"{family} {method}: {rel:.2e}")
    assert rel <= 1e-5
    if family == "timm" and method == "residual_full":   # a prototype head: transfer to other classes needs a text tower
        from residual_exp.data.errors import DatasetError
        from residual_exp.tasks.evaluate import evaluate
        ecfg = compose_cfg([*TINY, "task=evaluate", f"model_dir={out}", "dataset=shapes_color"], tmp_path / "ev")
        with pytest.raises(DatasetError, match="no text tower") as e:
            evaluate(ecfg)
        assert "shapes_color" in str(e.value) and not (tmp_path / "ev" / "run" / "results.json").exists()


@pytest.mark.parametrize("method, others", [("residual_full", "add"), ("residual_coarse", "add"),
                                            ("residual_fine", "add"), ("residual_fine", "official-mean")])
def test_attention_pooled_fold_is_exact_in_float64(tmp_path, method, others):
    """MAP units have no per-unit lift: the fold is one D × D map per unit on the units the
    decomposed forward rebuilds; in float64 it equals the training-time module to round-off
    (``official-mean``: compat=official's batch mean of the other units, bug (d))."""
    from residual_exp.export import AdaptedModel
    extra = ["compat=official", "method.others=mean"] if others == "official-mean" else ["method.others=add"]
    cfg, run_dir = _train(tmp_path, method, *ARCHS["timm_map_siglip_like"], *SMALL, *extra)
    module, split = reference_module(cfg, run_dir, torch.float64)
    state = {k[len("adapter."):]: v.double() for k, v in module.state_dict().items() if k.startswith("adapter.")}
    bb = module.feed.backbone
    assert bb.pooling().kind == "map" and "pool.mlp" in bb.layout.names
    folded = type(module.adapter).fold(state, bb.readout(), cfg.method, cfg.cache.layout,
                                       "official" if others == "official-mean" else "none")
    assert folded.units is not None and folded.heads is None
    head = module.head
    model = AdaptedModel(bb, folded, head.weight.double(), head.scale, head.normalize_weights, split.classnames, {})
    images = torch.stack([split[i][0] for i in range(len(split))]).double()
    want = reference_logits(module, split)
    rel = float((model.eval()(images) - want).abs().max() / want.abs().max())
    print(f"MAP {method} float64 fold: {rel:.2e}")
    assert rel <= 1e-10


def test_prototype_head_on_a_text_model_needs_no_text(tmp_path, monkeypatch):
    """classifier=prototype: a model with a text tower trains against class-mean prototypes, never
    tokenizes, records the head, and its export reproduces the logits."""
    from residual_exp.backbones.open_clip_backbone import OpenClipBackbone

    def no_text(self, texts):
        raise AssertionError("the text tower was used")
    monkeypatch.setattr(OpenClipBackbone, "tokenize", no_text)
    cfg, run_dir = _train(tmp_path, "residual_full", "classifier=prototype", *SMALL)
    records = json.loads((run_dir / "results.json").read_text())
    assert {r["classifier"] for r in records} == {"prototype-mean"}
    out = _export(cfg, run_dir)
    assert json.loads((out / "adapted.json").read_text())["classifier"]["kind"] == "prototype-mean"
    module, split = reference_module(cfg, run_dir)
    from residual_exp.export import load_adapted
    images = torch.stack([split[i][0] for i in range(len(split))])
    want = reference_logits(module, split)
    assert float((load_adapted(out)(images) - want).abs().max() / want.abs().max()) <= 1e-5


# --- predict / evaluate -------------------------------------------------------------------------------
def _shapes_folder(folder: Path, n: int = 12, corrupt: bool = False) -> list[Path]:
    from residual_exp.data.registry import build_split
    cfg = compose_cfg(["dataset.params.n_test=32"])
    split = build_split(cfg.dataset, "test", None)
    (folder / "sub").mkdir(parents=True)
    paths = []
    for i in range(n):
        img, y = split[i]
        p = folder / ("sub" if i % 3 == 0 else "") / f"{i:03d}_{split.classnames[y]}.png"
        img.save(p)
        paths.append(p)
    if corrupt:
        (folder / "sub" / "broken.png").write_bytes(paths[1].read_bytes()[:80])
    return paths


def _cli(args, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "residual_exp", *args, f"paths.root_dir={tmp_path}",
                           f"hydra.run.dir={tmp_path / 'cli'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    return proc


def test_predict_folder_glob_and_file(trained, tmp_path):
    from PIL import Image
    _, _, exports = trained
    paths = _shapes_folder(tmp_path / "imgs")
    proc = _cli(["task=predict", f"model_dir={exports['residual_full']}", f"inputs={tmp_path / 'imgs'}",
                 "task.top_k=3", f"task.out_dir={tmp_path / 'p1'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (tmp_path / "p1" / "predictions.csv").read_text().splitlines()
    assert lines[0] == "path,top1,p1,top2,p2,top3,p3" and len(lines) == 1 + len(paths)
    assert {l.split(",")[0] for l in lines[1:]} == {str(p) for p in paths}
    probs = [float(x) for x in lines[1].split(",")[2::2]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    with Image.open(tmp_path / "p1" / "predictions.png") as im:
        assert im.format == "PNG" and im.size[0] > 200
    proc = _cli(["task=predict", f"model_dir={exports['base']}", f"inputs={tmp_path / 'imgs' / 'sub' / '*.png'}",
                 f"task.out_dir={tmp_path / 'p2'}", "task.grid=0"], tmp_path)
    assert proc.returncode == 0 and len((tmp_path / "p2" / "predictions.csv").read_text().splitlines()) == 5
    assert not (tmp_path / "p2" / "predictions.png").exists()
    proc = _cli(["task=predict", f"model_dir={exports['base']}", f"inputs={paths[0]}",
                 f"task.out_dir={tmp_path / 'p3'}"], tmp_path)
    assert proc.returncode == 0 and len((tmp_path / "p3" / "predictions.csv").read_text().splitlines()) == 2


def test_predict_names_a_corrupt_file_and_writes_nothing(trained, tmp_path):
    _, _, exports = trained
    _shapes_folder(tmp_path / "imgs", corrupt=True)
    proc = _cli(["task=predict", f"model_dir={exports['residual_fine']}", f"inputs={tmp_path / 'imgs'}",
                 f"task.out_dir={tmp_path / 'out'}"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: inputs: cannot decode image file '{tmp_path / 'imgs' / 'sub' / 'broken.png'}'" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    proc = _cli(["task=predict", f"model_dir={exports['base']}", f"inputs={tmp_path / 'none' / '*.jpg'}"], tmp_path)
    assert proc.returncode == 2 and "no image files" in proc.stderr


def test_evaluate_same_dataset_and_transfer(trained, tmp_path):
    from residual_exp.tasks.evaluate import evaluate
    _, runs, exports = trained
    cfg, run_dir = runs["residual_full"]
    trained_test = next(r for r in json.loads((run_dir / "results.json").read_text())
                        if r["method"] == "residual_full")["test_accuracy"]
    ecfg = compose_cfg([*TINY, "task=evaluate", f"model_dir={exports['residual_full']}"], tmp_path)
    assert evaluate(ecfg) == 0
    rec, = json.loads((tmp_path / "run" / "results.json").read_text())
    assert rec["test_accuracy"] == pytest.approx(trained_test, abs=1e-9) and rec["head"] == "export"
    assert rec["method"] == "residual_full" and rec["trained_on"] == rec["dataset"] == "shapes_shape"
    ecfg = compose_cfg([*TINY, "task=evaluate", f"model_dir={exports['residual_full']}", "dataset=shapes_color"],
                       tmp_path / "t")
    assert evaluate(ecfg) == 0
    rec, = json.loads((tmp_path / "t" / "run" / "results.json").read_text())
    assert rec["dataset"] == "shapes_color" and rec["trained_on"] == "shapes_shape"
    assert rec["head"] == "zero-shot (new classes)" and 0.0 <= rec["test_accuracy"] <= 1.0
    from residual_exp.results import CONVENTION_KEYS, RESULT_KEYS
    assert set(rec) >= set(RESULT_KEYS) | set(CONVENTION_KEYS) and rec["seed"] == cfg.seed
    assert rec["classifier"] == "text" and rec["n_images"] == 32
    # the new head is the text tower's zero-shot head on the adapted features: recompute it here
    from residual_exp.classifiers import zero_shot_weights
    from residual_exp.data.registry import build_split
    from residual_exp.export import load_adapted
    model = load_adapted(exports["residual_full"])
    split = build_split(ecfg.dataset, "test", model.preprocess)
    w = zero_shot_weights(model.backbone, split.classnames, split.templates, "cpu", progress=False).float()
    images = torch.stack([split[i][0] for i in range(len(split))])
    labels = torch.tensor([split[i][1] for i in range(len(split))])
    feats = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
    assert rec["test_accuracy"] == pytest.approx(float(((feats @ w.T).argmax(-1) == labels).float().mean()))


# --- trust: the export's checksums, its scale, the zero-shot column, what predict prints ------------------------
def _copy_export(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_a_changed_export_file_is_refused_naming_it_and_the_check_can_be_skipped(trained, tmp_path):
    from residual_exp.export import MANIFEST_FILE, ExportError, load_adapted
    _, _, exports = trained
    src = exports["residual_full"]
    manifest = json.loads((src / MANIFEST_FILE).read_text())
    assert set(manifest["files"]) == {"adapted.json", "adapted.safetensors"}              # weights: the embedded CLIP
    copied = json.loads((exports["finetune"] / MANIFEST_FILE).read_text())
    assert set(copied["files"]) == {"adapted.json", "adapted.safetensors", "backbone.safetensors"}
    flipped = _copy_export(src, tmp_path / "flipped")
    data = bytearray((flipped / "adapted.safetensors").read_bytes())
    data[-5] ^= 0xFF                                                  # one byte of the folded tensors
    (flipped / "adapted.safetensors").write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"flipped/adapted.safetensors: changed since it was exported \(checksum"):
        load_adapted(flipped)
    load_adapted(flipped, verify=False)                               # the documented way around the check
    import residual_exp
    with pytest.raises(ExportError):
        residual_exp.load_adapted(flipped)                            # the package's entry point checks too …
    residual_exp.load_adapted(flipped, verify=False)                  # … and takes the same way around it
    _shapes_folder(tmp_path / "imgs")
    proc = _cli(["task=predict", f"model_dir={flipped}", f"inputs={tmp_path / 'imgs'}",
                 f"task.out_dir={tmp_path / 'p'}"], tmp_path)
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "adapted.safetensors: changed since" in errors[0]
    assert "Traceback" not in proc.stderr and not (tmp_path / "p" / "predictions.csv").exists()
    proc = _cli(["task=predict", f"model_dir={flipped}", f"inputs={tmp_path / 'imgs'}", "task.verify_export=false",
                 f"task.out_dir={tmp_path / 'p'}"], tmp_path)
    assert proc.returncode == 0 and (tmp_path / "p" / "predictions.csv").is_file()
    # relabelled classes (an edited adapted.json) and a missing file are refused the same way
    relabelled = _copy_export(src, tmp_path / "relabelled")
    conf = json.loads((relabelled / "adapted.json").read_text())
    conf["classnames"] = list(reversed(conf["classnames"]))
    (relabelled / "adapted.json").write_text(json.dumps(conf, indent=1))
    with pytest.raises(ExportError, match=r"relabelled/adapted.json: changed since it was exported"):
        load_adapted(relabelled)
    tuned = _copy_export(exports["finetune"], tmp_path / "tuned")
    (tuned / "backbone.safetensors").unlink()
    with pytest.raises(ExportError, match=r"tuned/backbone.safetensors: missing from the export"):
        load_adapted(tuned)
    (relabelled / MANIFEST_FILE).unlink()
    with pytest.raises(ExportError, match=r"no manifest.json"):
        load_adapted(relabelled)


def test_export_records_the_scale_its_classifier_uses_and_refuses_foreign_outputs(trained, tmp_path):
    from residual_exp.errors import UserError
    from residual_exp.tasks.export import export
    tmp, runs, exports = trained
    conf = json.loads((exports["residual_full"] / "adapted.json").read_text())
    assert conf["classifier"]["kind"] == "text"
    assert conf["backbone"]["logit_scale"] == conf["classifier"]["scale"] != 100.0     # the tiny CLIP's own ~14.8
    cfg, run_dir = runs["residual_coarse"]
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("mine")
    for out, phrase in ((tmp_path / "foreign", "exists and is not an export folder"),
                        (tmp_path / "foreign" / "keep.txt", "is a file, not a folder")):
        with pytest.raises(UserError, match=phrase):
            export(compose_cfg(["task=export", f"run_dir={run_dir}", f"out={out}"]))
    assert (tmp_path / "foreign" / "keep.txt").read_text() == "mine"
    again = exports["residual_coarse"]                                  # an earlier export is replaced in place
    before = json.loads((again / "adapted.json").read_text())["provenance"]["exported_at"]
    assert export(compose_cfg(["task=export", f"run_dir={run_dir}", f"out={again}"])) == 0
    assert (again / "manifest.json").is_file() and not list(again.parent.glob(f".{again.name}.*"))
    assert json.loads((again / "adapted.json").read_text())["provenance"]["exported_at"] >= before


def test_evaluate_fills_the_zero_shot_column(trained, tmp_path):
    from residual_exp.tasks.evaluate import evaluate
    _, runs, exports = trained
    cfg, run_dir = runs["residual_full"]
    train_rec = {r["method"]: r for r in json.loads((run_dir / "results.json").read_text())}
    assert evaluate(compose_cfg([*TINY, "task=evaluate", f"model_dir={exports['residual_full']}"], tmp_path)) == 0
    rec, = json.loads((tmp_path / "run" / "results.json").read_text())
    # same dataset, same head: the frozen feature's accuracy is the run's own zero-shot test accuracy
    assert rec["zero_shot_test_accuracy"] == pytest.approx(train_rec["base"]["test_accuracy"], abs=1e-9)
    assert evaluate(compose_cfg([*TINY, "task=evaluate", f"model_dir={exports['finetune']}"], tmp_path / "ft")) == 0
    rec, = json.loads((tmp_path / "ft" / "run" / "results.json").read_text())
    assert rec["zero_shot_test_accuracy"] is None and "finetune export" in rec["zero_shot_note"]


def test_predict_says_when_it_prints_only_the_first_rows(trained, tmp_path):
    _, _, exports = trained
    _shapes_folder(tmp_path / "imgs", n=14)
    proc = _cli(["task=predict", f"model_dir={exports['base']}", f"inputs={tmp_path / 'imgs'}", "task.grid=0",
                 f"task.out_dir={tmp_path / 'p'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "… the first 10 of 14 images; every row is in predictions.csv" in proc.stdout
    assert len((tmp_path / "p" / "predictions.csv").read_text().splitlines()) == 15
