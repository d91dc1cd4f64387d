"""Every bad value is refused right after composition (residual_exp/validate.py): one ConfigError
naming the key, the value and what is allowed; the CLI prints it and exits 2, fast, no traceback."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from residual_exp import validate as V
from residual_exp.run import run
from residual_exp.validate import ConfigError, validate
from tests.conftest import CONF, ROOT, compose_cfg

GROUPS = ["model", "dataset", "method", "pca", "units", "rank", "trainer", "logger", "task", "analysis"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def refused(overrides: list[str], *expected: str) -> ConfigError:
    """The command line ``overrides`` is refused before anything runs — at composition (a value
    outside an enum: OmegaConf refuses it, :func:`residual_exp.overrides.precheck` words it) or by
    ``run(compose(overrides))`` (ConfigError) — with messages holding every ``expected``."""
    from residual_exp.overrides import precheck
    problems = precheck(overrides)
    if not problems:
        with pytest.raises(ConfigError) as e:
            run(compose_cfg(overrides))
        assert str(e.value).splitlines() == e.value.problems
        problems = e.value.problems
    msg = "\n".join(problems)
    for part in expected:
        assert part in msg, f"{part!r} not in:\n{msg}"
    return ConfigError(problems)


# --- the catalog is the one source; the code it names exists ----------------------------------------------
def test_every_catalog_family_registers_itself_when_its_module_is_imported():
    from residual_exp.backbones import list_families
    from residual_exp.catalog import FAMILIES
    assert set(FAMILIES) <= set(list_families())


@pytest.mark.parametrize("group", ["dataset", "method", "model"])
def test_every_option_has_a_spec_whose_import_paths_resolve(group):
    from residual_exp.catalog import load, spec
    from residual_exp.methods.base import Adapter
    for name in _options(group):
        s = spec(group, name)
        assert s.description, f"{group}={name}: spec.description is empty"
        if group == "dataset":
            assert callable(load(s.builder)) and (s.labels is None or callable(load(s.labels)))
        elif group == "method":
            assert issubclass(load(s.adapter), Adapter)


def test_trainer_precisions_are_lightnings():
    from typing import get_args

    from lightning.fabric.connector import _PRECISION_INPUT_INT, _PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS

    from residual_exp.catalog import TRAINER_PRECISIONS
    lightning = {str(p) for p in get_args(_PRECISION_INPUT_STR) + get_args(_PRECISION_INPUT_INT)
                 + get_args(_PRECISION_INPUT_STR_ALIAS)}
    assert set(TRAINER_PRECISIONS) <= lightning


def test_every_task_and_analysis_config_has_a_schema_naming_its_implementation():
    from residual_exp.analysis.config import ANALYSES
    from residual_exp.catalog import load
    from residual_exp.config import TASKS
    assert set(_options("task")) == set(TASKS) and set(_options("analysis")) == set(ANALYSES)
    for name, schema in TASKS.items():
        assert callable(load(schema.run)), name


def test_validate_is_import_light():
    code = ("import sys; from tests.conftest import compose_cfg; from residual_exp.validate import validate; "
            "from residual_exp.run import run; validate(compose_cfg([])); "
            "import residual_exp.__main__; assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


# --- what is valid stays valid ---------------------------------------------------------------------------
def _needs(group: str, option: str, tmp_path) -> list[str]:
    """The overrides a template option needs to be runnable (open_clip / timm: an architecture)."""
    if group == "model" and option in ("open_clip", "timm"):
        return ["model.arch=ViT-B-16" if option == "open_clip" else "model.arch=vit_base_patch16_224"]
    if group == "task" and option == "export":
        return [f"run_dir={tmp_path}"]
    if group == "task" and option == "predict":
        return [f"model_dir={tmp_path}", f"inputs={tmp_path}"]
    if group == "task" and option == "evaluate":
        return [f"model_dir={tmp_path}"]
    if group == "task" and option == "dashboard":
        return [f"sweep_dir={tmp_path}"]
    if group == "units":      # the selections that need their argument; output is for output methods
        return {"layers": ["units.layers=[2,3]"], "names": ["units.include=[L3H*]"], "output": ["method=base"],
                "coarse_top": [f"units.run_dir={_coarse_run(tmp_path)}"]}.get(option, [])
    return []


def _coarse_run(tmp_path):
    """A folder holding what a coarse_selection analysis writes (head_scores.csv)."""
    (tmp_path / "head_scores.csv").write_text("model,unit,layer,head,zero_shot,zero_shot_rank\n"
                                              "tiny_clip,L0H0,0,0,0.5,1\n")
    return tmp_path


def test_default_config_validates():
    validate(compose_cfg([]))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_validates(group, option, tmp_path):
    overrides = [f"{group}={option}", *_needs(group, option, tmp_path)]
    if group == "analysis":
        overrides.insert(0, "task=analysis")
    validate(compose_cfg(overrides))


@pytest.mark.parametrize("cell", _options("ablation"))
def test_every_ablation_cell_validates(cell):
    cfg = compose_cfg([f"+ablation={cell}"])
    validate(cfg)
    assert cfg.method.name == cell.split("_")[0] + "_" + cell.split("_")[1]


def test_task_analysis_without_an_analysis_is_left_to_the_task():
    validate(compose_cfg(["task=analysis"]))          # the task prints the analyses and returns 2


@pytest.mark.parametrize("preset", [f"{d}/{p.stem}" for d in ("paper", "sweep", "ablation")
                                    for p in sorted((CONF / "experiment" / d).glob("*.yaml"))])
def test_every_experiment_preset_validates(preset):
    validate(compose_cfg([f"+experiment={preset}"]))


@pytest.mark.parametrize("method", _options("method"))
def test_every_method_of_the_paper_protocol_validates(method):
    validate(compose_cfg(["+experiment=paper/vit_l_sun397", f"method={method}"]))
    validate(compose_cfg(["+experiment=sweep/synthetic", f"method={method}", "compat=official"]))


@pytest.mark.parametrize("overrides", [
    ["method=base", "method.cache=false"],             # pointless but allowed
    ["method=base", "method.lr=-5"],                   # base trains nothing: lr unused
    ["method=linear_adapter", "method.init=identity"],
    ["method=residual_full", "units=all", "conventions.units=centred", "method.others=mean"],
    ["method=residual_fine", "rank=k", "rank.k=4"],
    ["method=residual_full", "units=layers", "units.layers=[3,3]", "units.kinds=[head]"],
    ["method=residual_full", "units=names", "units.include=[L3H*,L2.mlp]", "units.exclude=[L3H0]"],
    ["method=residual_full", "method.init=eigenvalues", "rank=evr", "rank.evr=1.0"],
    ["+model.params.anything=1", "+dataset.params.whatever={a:1}", "logger=csv", "+logger.flush_logs_every_n_steps=5"],
    ["pca=imagenet", "dataset@pca.reference=sun397", "pca.max_samples=2"],
    ["device=cpu", "trainer.accelerator=cpu", "trainer.precision=bf16-mixed", "trainer.cpu_threads=1"],
    ["seed=4294967295", "cache.dtype=float64", "cache.layout=dense", "cache.verify=size"],
    ["task=cache", "task.action=prune", "task.kinds=[bases]"],
    ["task=plan", "task.grid.model=[clip_b,clip_l]", "task.grid.method=[base,finetune]", "task.grid.dataset=[dtd]"],
    ["task=analysis", "analysis=spectral_similarity",
     "analysis.datasets=[shapes_shape,{name:shapes_color,label:other_seed,params:{seed:3,n_test:100}}]"],
    ["task=analysis", "analysis=intrinsic_dimension", "analysis.models=[tiny_clip,{name:tiny_clip,pretrained:null,label:random}]"],
])
def test_valid_variations_validate(overrides):
    validate(compose_cfg(overrides))


# --- types and ranges ------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,expected", [
    (["seed=-1"], ["seed=-1", "≥ 0"]),
    (["seed=4294967296"], ["seed=4294967296", "2**32"]),
    (["trainer.max_epochs=0"], ["trainer.max_epochs=0", "≥ 1"]),
    (["trainer.patience=-1"], ["trainer.patience=-1", "≥ 0"]),
    (["trainer.devices=0"], ["trainer.devices=0", "≥ 1"]),
    (["trainer.num_workers=-2"], ["trainer.num_workers=-2", "≥ 0"]),
    (["trainer.cpu_threads=0"], ["trainer.cpu_threads=0", "null or an integer ≥ 1"]),
    (["trainer.precision=bogus"], ["trainer.precision=bogus", "32-true", "bf16-mixed"]),
    (["method.lr=0"], ["method.lr=0.0", "> 0"]),
    (["method.lr=nan"], ["method.lr=nan", "finite"]),
    (["method.lr=inf"], ["method.lr=inf", "finite"]),
    (["method.batch_size=0"], ["method.batch_size=0", "≥ 1"]),
    (["method.weight_decay=-0.1"], ["method.weight_decay=-0.1", "≥ 0"]),
    (["method.grad_clip=0"], ["method.grad_clip=0.0", "null or a finite number > 0"]),
    (["rank=evr", "rank.evr=1.5"], ["rank.evr=1.5", "(0, 1]"]),
    (["rank=evr", "rank.evr=0"], ["rank.evr=0.0", "(0, 1]"]),
    (["rank=k", "rank.k=0"], ["rank.k=0", "≥ 1"]),
    (["method=residual_fine", "rank.k=5"], ["rank.k=5", "not both"]),
    (["units=layers"], ["units.layers=null", "units.layers=[first,last]"]),
    (["units=layers", "units.layers=[3,1]"], ["units.layers=[3,1]", "first ≤ last"]),
    (["units=layers", "units.layers=[5,9]"], ["units=layers", "selects no unit", "4 layers × 4 heads"]),
    (["units=names", "units.include=[L9*]"], ["units=names", "L9*", "selects no unit"]),
    (["units=names"], ["units.include=[]", "units.include=[L11H*,L10.mlp]"]),
    (["units=coarse_top"], ["units.run_dir=null", "coarse_selection"]),
    (["units=coarse_top", "units.fraction=0"], ["units.fraction=0.0", "(0, 1]"]),
    (["method.dropped_value=nan"], ["method.dropped_value=nan", "finite"]),
    (["dataset.batch_size=0"], ["dataset.batch_size=0", "≥ 1"]),
    (["dataset.num_workers=-1"], ["dataset.num_workers=-1", "≥ 0"]),
    (["pca.max_samples=1"], ["pca.max_samples=1", "≥ 2"]),
    (["cache.memory_budget_gb=0"], ["cache.memory_budget_gb=0.0", "> 0"]),
    (["model.image_size=0"], ["model.image_size=0", "≥ 1"]),
    (["model.logit_scale=-1"], ["model.logit_scale=-1.0", "> 0"]),
    (["task=check_decomposition", "task.tolerance=0"], ["task.tolerance=0.0", "> 0"]),
    (["task=check_decomposition", "task.batch_size=0"], ["task.batch_size=0", "≥ 1"]),
    (["task=check_decomposition", "task.dtype=float16"], ["task.dtype=float16", "float32 | float64"]),
    (["task=pretrain_tiny_clip", "task.n_images=0"], ["task.n_images=0", "≥ 1"]),
    (["task=pretrain_tiny_clip", "task.epochs=0"], ["task.epochs=0", "≥ 1"]),
    (["task=pretrain_tiny_clip", "task.batch_size=0"], ["task.batch_size=0", "≥ 1"]),
    (["task=pretrain_tiny_clip", "task.lr=0"], ["task.lr=0.0", "> 0"]),
    (["task=plan", "task.typical_epoch_fraction=2"], ["task.typical_epoch_fraction=2.0", "(0, 1]"]),
    (["task=plan", "task.throughput.train_steps=0"], ["task.throughput.train_steps=0", "> 0"]),
    (["task=analysis", "analysis=intrinsic_dimension", "analysis.max_samples=1"], ["analysis.max_samples=1", "≥ 2"]),
    (["task=analysis", "analysis=intrinsic_dimension", "analysis.variance_threshold=1.5"],
     ["analysis.variance_threshold=1.5", "(0, 1]"]),
    (["task=analysis", "analysis=intrinsic_dimension", "analysis.discard_fraction=1"],
     ["analysis.discard_fraction=1.0", "[0, 1)"]),
    (["task=analysis", "analysis=coarse_selection", "analysis.keep_fractions=[0.5,0]"],
     ["analysis.keep_fractions[1]=0.0", "(0, 1]"]),
    (["task=analysis", "analysis=coarse_selection", "analysis.keep_top=[0]"], ["analysis.keep_top[0]=0", "≥ 1"]),
    (["task=analysis", "analysis=coarse_selection", "analysis.random_seeds=[-1]"], ["analysis.random_seeds[0]=-1"]),
    (["task=analysis", "analysis=spectral_similarity", "analysis.evr=0"], ["analysis.evr=0.0", "(0, 1]"]),
    (["task=analysis", "analysis=text_spans", "analysis.n_components=0"], ["analysis.n_components=0", "≥ 1"]),
    (["task=analysis", "analysis=text_spans", "analysis.n_descriptions=0"], ["analysis.n_descriptions=0"]),
    (["task=analysis", "analysis=text_spans", "analysis.n_lambda=0"], ["analysis.n_lambda=0"]),
])
def test_types_and_ranges(overrides, expected):
    refused(overrides, *expected)


# --- enums -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,expected", [
    (["device=gpu"], ["device=gpu", "auto | cpu | cuda | cuda:N"]),
    (["device=cuda:x"], ["device=cuda:x", "cuda:N"]),
    (["method.name=residual_medium"], ["method.name=residual_medium", "residual_full"]),
    (["units=heeds"], ["units=heeds", "not a units config", "heads_mlps"]),
    (["units.kinds=[head,bias]"], ["units.kinds", "embed | head | mlp | pool | const"]),
    (["method.units=heads"], ["unknown key method.units", "did you mean units=NAME"]),
    (["method.evr=0.9"], ["unknown key method.evr", "did you mean rank=evr rank.evr=X"]),
    (["method.others=sometimes"], ["method.others=sometimes", "drop | mean | add"]),
    (["method.init=zeros"], ["method.init=zeros", "normal | ones | eigenvalues"]),
    (["cache.layout=sparse"], ["cache.layout=sparse", "lowrank | dense"]),
    (["cache.dtype=int8"], ["cache.dtype=int8", "auto | float16 | float32 | float64"]),
    (["cache.verify=never"], ["cache.verify=never", "once | always | size"]),
    (["conventions.units=raw"], ["conventions.units=raw", "official | centred"]),
    (["conventions.prototype=knn"], ["conventions.prototype=knn", "mean | cosine"]),
    (["conventions.evr_rule=loose"], ["conventions.evr_rule=loose", "strict | inclusive"]),
    (["conventions.similarity_weights=none"], ["conventions.similarity_weights=none", "sqrt_eigenvalues"]),
    (["conventions.similarity_unweighted=any"], ["conventions.similarity_unweighted=any", "diagonal | matched"]),
    (["compat=bugs"], ["compat=bugs", "none | official"]),
    (["classifier=linear"], ["classifier=linear", "auto | text | prototype"]),
    (["model.precision=fp16"], ["model.precision=fp16", "auto | fp32 | bf16"]),
    (["model.family=keras"], ["model.family=keras", "blip | open_clip | timm | tiny_clip"]),
    (["model.pretrained=openai"], ["model.pretrained=openai", "embedded or null"]),       # tiny_clip
    (["dataset.name=cifar11"], ["dataset.name=cifar11", "shapes_color"]),
    (["pca.split=holdout"], ["pca.split=holdout", "train | val | test | reference"]),
    (["trainer.accelerator=quantum"], ["trainer.accelerator=quantum", "auto | cpu | gpu"]),
    (["task=cache", "task.action=purge"], ["task.action=purge", "list | verify | prune"]),
    (["task=cache", "task.kinds=[encodings,logs]"], ["task.kinds=[encodings,logs]", "classifiers"]),
    (["task=plan", "task.grid.method=[base,residual_half]"], ["task.grid.method[1]=residual_half"]),
    (["task=plan", "task.grid.model=[clip_xl]"], ["task.grid.model[0]=clip_xl", "clip_b"]),
    (["task=train", "task.name=fly"], ["task.name=fly", "train"]),
    (["task=analysis", "analysis=spectral_similarity", "analysis.variants=[both]"],
     ["analysis.variants=[both]", "weighted | unweighted"]),
    (["task=analysis", "analysis=spectral_similarity", "analysis.cross_model=maybe"],
     ["analysis.cross_model=maybe", "profile | raw | none"]),
    (["task=analysis", "analysis=spectral_similarity", "analysis.datasets=[cifar11]"],
     ["analysis.datasets[0]=cifar11", "not a dataset config"]),
    (["task=analysis", "analysis=spectral_similarity", "analysis.reference=cifar11"], ["analysis.reference=cifar11"]),
    (["task=analysis", "analysis=spectral_similarity", "analysis.split=holdout"], ["analysis.split=holdout"]),
    (["task=analysis", "analysis=coarse_selection", "analysis.ablations=[noise]"],
     ["analysis.ablations=[noise]", "zero | mean"]),
    (["task=analysis", "analysis=coarse_selection", "analysis.scores=[luck]"],
     ["analysis.scores=[luck]", "zero_shot"]),
    (["task=analysis", "analysis=coarse_selection", "analysis.others=mean"], ["analysis.others=mean", "drop | add"]),
    (["task=analysis", "analysis=intrinsic_dimension", "analysis.estimator=ml"], ["analysis.estimator=ml", "linear | mle"]),
    (["task=analysis", "analysis=intrinsic_dimension", "analysis.units=output"], ["analysis.units=output", "heads"]),
    (["task=analysis", "analysis=intrinsic_dimension", "analysis.models=[clip_xl]"],
     ["analysis.models[0]=clip_xl", "not a model config", "tiny_clip"]),
])
def test_enums(overrides, expected):
    refused(overrides, *expected)


# --- combinations ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,expected", [
    (["method=base", "units=heads"], ["units=heads", "method=base", "takes units=output"]),
    (["method=finetune", "units=all"], ["units=all", "takes units=output"]),
    (["method=linear_adapter", "units=heads"], ["units=heads", "takes units=output"]),
    (["method=spectral_adapter", "units=mlps"], ["units=mlps", "takes units=output"]),
    (["method=residual_coarse", "units=output"], ["units=output", "not output"]),
    (["method=residual_full", "units=output"], ["units=output", "not output"]),
    (["method=spectral_adapter", "method.others=mean"], ["method.others=mean", "residual_*"]),
    (["method=base", "method.others=mean"], ["method.others=mean", "residual_*"]),
    (["method=residual_coarse", "method.init=eigenvalues"], ["method.init=eigenvalues", "residual_coarse"]),
    (["method=linear_adapter", "method.init=ones"], ["method.init=ones", "default", "identity"]),
    (["method=residual_full", "method.init=identity"], ["method.init=identity", "normal | ones | eigenvalues"]),
    (["compat=official", "conventions.units=centred"], ["conventions.units=centred", "compat=official"]),
    (["compat=official", "conventions.evr_rule=inclusive"], ["conventions.evr_rule=inclusive", "strict"]),
    (["pca=imagenet", "pca.reference.name=nowhere"], ["pca.reference.name=nowhere", "imagenet"]),
    (["pca=imagenet", "pca.reference.batch_size=0"], ["pca.reference.batch_size=0"]),
    (["model=open_clip"], ["model.arch=null", "model.family=open_clip"]),
    (["model=timm", "model.arch=vit_base_patch16_224", "classifier=text"], ["classifier=text", "no text tower"]),
    (["model=timm"], ["model.arch=null", "model.family=timm"]),
    (["model.weights=/no/such/checkpoint.pt"], ["model.weights=/no/such/checkpoint.pt", "no such file"]),
    (["task=export"], ["run_dir=null", "task=export needs run_dir"]),
    (["task=export", "run_dir=/no/such/run"], ["run_dir=/no/such/run", "no such directory"]),
    (["task=analysis", "analysis=text_spans", "analysis.run_dir=/no/such/run"], ["analysis.run_dir=/no/such/run"]),
    (["task=analysis", "analysis=text_spans", "analysis.dictionary=/no/such.txt"], ["analysis.dictionary=/no/such.txt"]),
])
def test_combinations(overrides, expected):
    refused(overrides, *expected)


@pytest.mark.skipif("_cuda()", reason="this machine has CUDA")
@pytest.mark.parametrize("overrides,key", [(["device=cuda"], "device=cuda"), (["device=cuda:1"], "device=cuda:1"),
                                           (["trainer.accelerator=gpu"], "trainer.accelerator=gpu")])
def test_cuda_requested_without_cuda(overrides, key):
    refused(overrides, key, "CUDA is not available")


# --- unknown keys ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,expected", [
    (["+method.lrr=1"], ["unknown key method.lrr (did you mean method.lr?)", "method.lrr=1"]),
    (["+trainer.foo=2"], ["unknown key trainer.foo", "trainer.foo=2", "max_epochs"]),
    (["+bar=1"], ["unknown key bar", "bar=1"]),
    (["+lr=1"], ["unknown key lr (did you mean method.lr?)"]),
    (["+cache.layuot=dense"], ["unknown key cache.layuot (did you mean cache.layout?)"]),
    (["+conventions.unit=centred"], ["unknown key conventions.unit (did you mean conventions.units?)"]),
    (["+paths.outputs=x"], ["unknown key paths.outputs"]),
    (["+model.param.x=1"], ["unknown key model.param (did you mean model.params?)"]),
    (["+task.verify=true"], ["unknown key task.verify"]),                          # task=train has none
    (["pca=imagenet", "+pca.reference.nam=x"], ["unknown key pca.reference.nam (did you mean pca.reference.name?)"]),
    (["task=plan", "+task.grid.models=[clip_b]"], ["unknown key task.grid.models (did you mean task.grid.model?)"]),
    (["task=analysis", "analysis=text_spans", "+analysis.n_component=3"],
     ["unknown key analysis.n_component (did you mean analysis.n_components?)"]),
    (["task=analysis", "analysis=spectral_similarity", "analysis.datasets=[{name:shapes_color,lable:x}]"],
     ["unknown key analysis.datasets[0].lable (did you mean label?)"]),
])
def test_unknown_keys(overrides, expected):
    refused(overrides, *expected)


def test_all_problems_are_reported_at_once():
    e = refused(["seed=-1", "method.lr=-1", "+method.lrr=1", "cache.layout=sparse"],
                "seed=-1", "method.lr=-1.0", "method.lrr", "cache.layout=sparse")
    assert len(e.problems) == 4


def test_refused_before_anything_is_built(tmp_path):
    code = ("import sys; from tests.conftest import compose_cfg; from residual_exp.run import run\n"
            "from residual_exp.validate import ConfigError\n"
            f"cfg = compose_cfg(['trainer.max_epochs=0', 'method.lr=-1'], __import__('pathlib').Path({str(tmp_path)!r}))\n"
            "try:\n    run(cfg)\nexcept ConfigError as e:\n    print(e)\nelse:\n    raise SystemExit('accepted')\n"
            "assert 'torch' not in sys.modules, 'torch imported before the refusal'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert "trainer.max_epochs=0" in proc.stdout and "method.lr=-1.0" in proc.stdout
    assert list(tmp_path.iterdir()) == []                  # no cache, no run folder


# --- the command line --------------------------------------------------------------------------------------
def _cli(args, tmp_path):
    env = dict(os.environ, RESIDUAL_EXP_ROOT=str(tmp_path), WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "residual_exp", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    return proc, time.perf_counter() - t0


@pytest.mark.parametrize("args,expected", [
    (["trainer.max_epochs=0"], "error: trainer.max_epochs=0: must be an integer ≥ 1"),
    (["+method.lrr=1"], "error: unknown key method.lrr (did you mean method.lr?)"),
    # refused by Hydra while composing, reported in our words (residual_exp/overrides.py)
    (["pca.k=0"], "error: unknown key pca.k (did you mean rank.k?): got pca.k=0; the keys of pca are:"),
    (["trainer.lr=-1"], "error: unknown key trainer.lr (did you mean method.lr?)"),
    (["+pca.evr=0.5"], "error: unknown key pca.evr (did you mean rank.evr?)"),
    (["model=nope"], "error: model=nope: not a model config; must be one of blip_l_flickr | clip_b"),
    (["task=report", "task.format=xml"], "error: unknown key task.format: got task.format=xml; the keys of task (report)"),
    (["pca.reference=nope"], "error: pca.reference=nope: a dataset config is expected: select one with dataset@pca.reference=NAME"),
    (["rank.k=[1"], "error: cannot parse the command line"),
    (["+method.lr=2"], "error: +method.lr=2: method.lr is already in the config: set it without '+' (method.lr=…)"),
    (["-m", "method=base,nope"], "error: method=nope: not a method config"),
    (["method=base", "units=heads"], "error: units=heads"),
    (["compat=official", "conventions.units=centred"], "error: conventions.units=centred"),
    (["device=quantum", "seed=-1"], "error: device=quantum"),
])
def test_cli_refuses_with_exit_2_and_one_message(args, expected, tmp_path):
    proc, elapsed = _cli(args, tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert expected in proc.stderr, proc.stderr
    assert "Traceback" not in out
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert elapsed < 5, f"{elapsed:.1f} s"
    assert not (tmp_path / "outputs" / "cache").exists()


@pytest.mark.skipif("_cuda()", reason="this machine has CUDA")
def test_cli_refuses_cuda_without_cuda(tmp_path):
    proc, elapsed = _cli(["device=cuda"], tmp_path)
    assert proc.returncode == 2 and "error: device=cuda: CUDA is not available" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr and elapsed < 5, elapsed


def test_cli_multirun_records_the_job_as_failed_with_the_message(tmp_path):
    proc, elapsed = _cli(["-m", "method=base,residual_coarse", "trainer.max_epochs=0", "logger=none"], tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "error: trainer.max_epochs=0" in proc.stderr and "Error executing job" in proc.stderr
    assert "Traceback" not in out
    assert elapsed < 10, f"{elapsed:.1f} s"


def test_precheck_expands_sweeps_and_leaves_hydra_flags_alone():
    from residual_exp.overrides import precheck
    assert precheck([]) == [] and precheck(["--help"]) == [] and precheck(["--cfg", "job", "pca.k=0"]) == []
    assert precheck(["-m", "method=base,residual_full", "seed=0,1", "hydra.sweep.dir=/x"]) == []
    assert precheck(["-m", "hydra/launcher=submitit_local", "+experiment=sweep/synthetic"]) == []
    assert precheck(["hydra/launcher=nope"]) == [
        "hydra/launcher=nope: not a hydra/launcher config; must be one of basic | slurm | submitit_local | submitit_slurm"]
    problems = precheck(["-m", "method=base,nope", "seed=range(0,2)", "pca.k=1"])
    assert problems == [
        "unknown key pca.k (did you mean rank.k?): got pca.k=1; the keys of pca are: reference, split, "
        "max_samples (a '+' would only add a key nothing reads)",
        "method=nope: not a method config; must be one of base | finetune | linear_adapter | residual_coarse | "
        "residual_fine | residual_full | spectral_adapter"], problems


def test_errors_re_raised_from_a_dataloader_worker_print_their_own_message():
    from residual_exp.__main__ import _message
    from residual_exp.data.errors import BadImageError
    wrapped = BadImageError("Caught BadImageError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                            "call last):\n  File \"x.py\", line 1, in f\n    raise BadImageError(msg)\n"
                            "residual_exp.data.errors.BadImageError: cannot decode image file '/d/a.jpg' (OSError)")
    assert _message(wrapped) == "error: cannot decode image file '/d/a.jpg' (OSError)"
    assert _message(BadImageError("plain: message")) == "error: plain: message"
