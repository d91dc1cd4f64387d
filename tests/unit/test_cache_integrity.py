"""Cache integrity: damaged entries are detected, moved aside, rebuilt — never used as they are."""
from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict
from safetensors.torch import load_file, save_file

import residual_exp.cache as cache_mod
from residual_exp.cache import DAMAGED_DIR, Cache, CacheError, manifest_path
from tests.conftest import ROOT, compose_cfg


def _arrays(tmp):                                  # a directory entry, like the encodings
    tmp.mkdir()
    rng = np.random.default_rng(0)
    np.save(tmp / "units.npy", rng.standard_normal((64, 32)))
    np.save(tmp / "labels.npy", np.arange(64))


def _load_arrays(p):
    return {k: np.array(np.load(p / f"{k}.npy", mmap_mode="r")) for k in ("units", "labels")}


def _tensors(tmp):                                 # a file entry, like the bases and classifiers
    save_file({"basis": torch.arange(256, dtype=torch.float64).reshape(16, 16)}, str(tmp))


def _load_tensors(p):
    return load_file(str(p))["basis"]


class Counter:
    def __init__(self, build):
        self.build, self.n = build, 0

    def __call__(self, tmp):
        self.n += 1
        self.build(tmp)


def _flip(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _entry(cache, kind, spec, suffix=""):
    return cache.path(kind, spec, suffix)


def test_an_unknown_verify_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"cache.verify='never'; valid: once \| always \| size"):
        Cache(tmp_path, verify="never")


def test_manifest_written_with_the_entry(tmp_path):
    cache = Cache(tmp_path)
    cache.get_or_build("encodings", {"a": 1}, _arrays, _load_arrays)
    entry = _entry(cache, "encodings", {"a": 1})
    files = json.loads(manifest_path(entry).read_text())["files"]
    assert sorted(files) == ["labels.npy", "spec.json", "units.npy"]
    assert files["units.npy"][0] == (entry / "units.npy").stat().st_size


@pytest.mark.parametrize("verify", ["once", "always"])
def test_flipped_bytes_in_an_npy_entry_are_caught_and_rebuilt(tmp_path, verify, caplog):
    build = Counter(_arrays)
    want = _load_arrays_fresh(tmp_path)
    Cache(tmp_path, verify=verify).get_or_build("encodings", {"a": 1}, build, _load_arrays)
    cache = Cache(tmp_path, verify=verify)
    entry = _entry(cache, "encodings", {"a": 1})
    _flip(entry / "units.npy", 1000)                    # inside the float data: loads fine, silently wrong
    cache_mod._verified.clear()                         # a new process
    with caplog.at_level(logging.WARNING, "residual_exp.cache"):
        got = cache.get_or_build("encodings", {"a": 1}, build, _load_arrays)
    assert build.n == 2
    assert np.array_equal(got["units"], want["units"]) and np.array_equal(got["labels"], want["labels"])
    assert "units.npy: checksum mismatch" in caplog.text and entry.name in caplog.text
    damaged = list((entry.parent / DAMAGED_DIR).iterdir())
    assert len(damaged) == 1 and "checksum mismatch" in (damaged[0] / "why.txt").read_text()
    assert (damaged[0] / entry.name / "units.npy").exists()            # kept, not deleted


def _load_arrays_fresh(tmp_path):
    fresh = tmp_path / "fresh"
    _arrays(fresh)
    return _load_arrays(fresh)


@pytest.mark.parametrize("verify", ["once", "size"])
def test_truncated_npy_is_rebuilt_not_a_numpy_error(tmp_path, verify):
    build = Counter(_arrays)
    cache = Cache(tmp_path, verify=verify)
    cache.get_or_build("encodings", {"a": 1}, build, _load_arrays)
    units = _entry(cache, "encodings", {"a": 1}) / "units.npy"
    units.write_bytes(units.read_bytes()[:-100])
    cache_mod._verified.clear()
    got = cache.get_or_build("encodings", {"a": 1}, build, _load_arrays)
    assert build.n == 2 and got["units"].shape == (64, 32)


def test_broken_safetensors_header_and_flipped_data_are_rebuilt(tmp_path):
    build = Counter(_tensors)
    cache = Cache(tmp_path)
    want = cache.get_or_build("bases", {"b": 1}, build, _load_tensors, suffix=".safetensors")
    entry = _entry(cache, "bases", {"b": 1}, ".safetensors")
    for offset in (10, entry.stat().st_size - 8):       # in the JSON header; in the float64 data
        _flip(entry, offset)
        cache_mod._verified.clear()
        got = cache.get_or_build("bases", {"b": 1}, build, _load_tensors, suffix=".safetensors")
        assert torch.equal(got, want)
    assert build.n == 3 and len(list((entry.parent / DAMAGED_DIR).iterdir())) == 2


def test_verify_size_catches_a_broken_header_through_the_loader_but_not_flipped_data(tmp_path):
    """Documented: ``cache.verify=size`` compares sizes only; a same-size flip in the data passes."""
    build = Counter(_tensors)
    cache = Cache(tmp_path, verify="size")
    want = cache.get_or_build("bases", {"b": 1}, build, _load_tensors, suffix=".safetensors")
    entry = _entry(cache, "bases", {"b": 1}, ".safetensors")
    _flip(entry, 10)                                    # the loader fails: damaged, rebuilt
    assert torch.equal(cache.get_or_build("bases", {"b": 1}, build, _load_tensors, suffix=".safetensors"), want)
    assert build.n == 2
    _flip(entry, entry.stat().st_size - 8)
    assert not torch.equal(cache.get_or_build("bases", {"b": 1}, build, _load_tensors, suffix=".safetensors"), want)


def test_missing_manifest_means_rebuild(tmp_path, caplog):
    build = Counter(_arrays)
    cache = Cache(tmp_path)
    cache.get_or_build("encodings", {"a": 1}, build, _load_arrays)
    manifest_path(_entry(cache, "encodings", {"a": 1})).unlink()     # e.g. an entry of an older version
    cache_mod._verified.clear()
    with caplog.at_level(logging.WARNING, "residual_exp.cache"):
        cache.get_or_build("encodings", {"a": 1}, build, _load_arrays)
    assert build.n == 2 and "no manifest" in caplog.text


def test_verify_once_checksums_once_per_process(tmp_path, monkeypatch):
    calls = []
    real = cache_mod.file_checksum
    monkeypatch.setattr(cache_mod, "file_checksum", lambda p: calls.append(p) or real(p))
    cache_mod._verified.clear()
    for verify, per_load in (("once", 0), ("always", 3)):
        cache = Cache(tmp_path / verify, verify=verify)
        cache.get_or_build("encodings", {"a": 1}, _arrays, _load_arrays)   # build: manifest (3) + first load
        n = len(calls)
        for _ in range(3):
            cache.get_or_build("encodings", {"a": 1}, _arrays, _load_arrays)
        assert len(calls) - n == 3 * per_load, verify


def test_an_entry_that_cannot_be_loaded_after_a_rebuild_is_a_cache_error(tmp_path):
    def broken_load(p):
        raise ValueError("mmap length is greater than file size")
    with pytest.raises(CacheError, match=r"not usable right after it was built .*ValueError: mmap length"):
        Cache(tmp_path).get_or_build("encodings", {"a": 1}, _arrays, broken_load)


REPAIRER = r"""
import json, os, sys
from pathlib import Path
import numpy as np
from residual_exp.cache import Cache

root, log = sys.argv[1], Path(sys.argv[2])

def build(tmp):
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    tmp.mkdir()
    np.save(tmp / "units.npy", np.arange(1000.0))

value = Cache(root).get_or_build("encodings", {"a": 1}, build, lambda p: float(np.load(p / "units.npy").sum()))
print(json.dumps(value))
"""


def test_concurrent_jobs_repair_a_damaged_entry_once(tmp_path):
    script = tmp_path / "repair.py"
    script.write_text(REPAIRER)
    log = tmp_path / "builds.log"
    run = lambda: subprocess.Popen([sys.executable, str(script), str(tmp_path / "cache"), str(log)], cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = run()
    assert first.communicate(timeout=120)[0].strip() == str(sum(range(1000)) * 1.0)
    entry = Cache(tmp_path / "cache").path("encodings", {"a": 1})
    _flip(entry / "units.npy", 200)
    procs = [run(), run()]                                           # e.g. seed=0 and seed=1 launched together
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert [o[0].strip() for o in outs] == [str(sum(range(1000)) * 1.0)] * 2
    assert len(log.read_text().split()) == 2                         # built once, repaired once
    assert len(list((entry.parent / DAMAGED_DIR).iterdir())) == 1


# --- task=cache ---------------------------------------------------------------------------------------
def _task(tmp_path, action, dry_run=False, verify="once"):
    from residual_exp.tasks.cache import cache_task
    return cache_task(OmegaConf.create({"cache": {"dir": str(tmp_path), "verify": verify},
                                        "task": {"name": "cache", "action": action, "dry_run": dry_run,
                                                 "kinds": ["encodings", "bases", "classifiers"]}}))


def test_task_cache_list_verify_prune(tmp_path, capsys):
    cache = Cache(tmp_path)
    cache.get_or_build("encodings", {"a": 1, "model": {"name": "tiny_clip"}}, _arrays, _load_arrays)
    cache.get_or_build("bases", {"b": 1}, _tensors, _load_tensors, suffix=".safetensors")
    assert _task(tmp_path, "list") == 0
    out = capsys.readouterr().out
    assert "2 entries" in out and "tiny_clip" in out and "NO" not in out

    assert _task(tmp_path, "verify") == 0
    assert "2 of 2 entries OK" in capsys.readouterr().out
    entry = cache.path("bases", {"b": 1}, ".safetensors")
    _flip(entry, entry.stat().st_size - 8)
    assert _task(tmp_path, "verify") == 1
    out = capsys.readouterr().out
    assert f"DAMAGED  bases/{entry.name}: .: checksum mismatch" in out and "1 of 2 entries OK" in out
    assert not entry.exists() and (entry.parent / DAMAGED_DIR).is_dir()

    (entry.parent / f".{entry.name}.host-1-abc.tmp").write_text("left by a killed builder")
    assert _task(tmp_path, "prune", dry_run=True) == 0
    out = capsys.readouterr().out
    assert f"would remove bases/{DAMAGED_DIR}" in out and ".tmp" in out
    assert (entry.parent / DAMAGED_DIR).exists()
    assert _task(tmp_path, "prune") == 0
    assert not (entry.parent / DAMAGED_DIR).exists()
    assert not list(entry.parent.glob(".*.tmp")) and not list(entry.parent.glob(f"{entry.name}*"))
    assert cache.path("encodings", {"a": 1, "model": {"name": "tiny_clip"}}).is_dir()   # live entries stay
    assert _task(tmp_path, "verify") == 0


def test_task_cache_list_flags_damage_and_prune_spares_running_builders(tmp_path, capsys):
    import os
    import socket
    from filelock import FileLock
    cache = Cache(tmp_path)
    for a in (1, 2, 3):
        cache.get_or_build("encodings", {"a": a}, _arrays, _load_arrays)
    short, bare, clean = (cache.path("encodings", {"a": a}) for a in (1, 2, 3))
    (short / "units.npy").write_bytes((short / "units.npy").read_bytes()[:-10])
    manifest_path(bare).unlink()
    assert _task(tmp_path, "list") == 0
    out = capsys.readouterr().out
    line = {e: next(l for l in out.splitlines() if e.name in l) for e in (short, bare, clean)}
    assert "DAMAGED" in line[short] and "no manifest" in line[bare] and "sizes ok" in line[clean]
    assert "2 entries damaged" in out and "3 entries" in out
    assert "DAMAGED" and "no manifest" in out and "sizes ok" in out and "2 entries damaged" in out

    folder = tmp_path / "encodings"
    live = folder / f".{clean.name}.{socket.gethostname()}-{os.getpid()}-0123abcd.nocache"   # this process
    live.mkdir()
    dead = folder / f".{clean.name}.{socket.gethostname()}-999999999-0123abcd.tmp"
    dead.mkdir()
    building = folder / f"{'f' * 16}"                                # its manifest is written before the rename
    manifest_path(building).write_text("{}")
    with FileLock(str(building) + ".lock"):
        assert _task(tmp_path, "prune") == 0
    out = capsys.readouterr().out
    assert dead.name in out and live.name not in out and manifest_path(building).name not in out
    assert live.exists() and not dead.exists() and manifest_path(building).exists()
    assert _task(tmp_path, "prune") == 0                             # the builder is gone: an orphan now
    assert not manifest_path(building).exists() and not (folder / f"{building.name}.lock").exists()
    assert live.exists()


def test_cache_admin_verdicts_and_sizes(tmp_path):
    """The library behind task=cache: a fine entry, a damaged one (moved aside, why kept), one
    removed by another job between listing and locking (nothing checked), bytes on disk."""
    from residual_exp.cache_admin import Verdict, disk_size, entries, verify_and_isolate
    cache = Cache(tmp_path)
    for a in (1, 2):
        cache.get_or_build("encodings", {"a": a}, _arrays, _load_arrays)
    fine, bad = (cache.path("encodings", {"a": a}) for a in (1, 2))
    assert entries(tmp_path / "encodings") == sorted([fine, bad])
    assert disk_size(fine) == sum(f.stat().st_size for f in fine.iterdir()) > 0
    assert disk_size(tmp_path / "nothing") == 0
    _flip(bad / "units.npy", 200)
    assert verify_and_isolate(fine, "always") == Verdict()
    v = verify_and_isolate(bad, "always")
    assert not v.gone and "units.npy: checksum mismatch" in v.why and not bad.exists()
    assert v.moved_to.parent == tmp_path / "encodings" / DAMAGED_DIR
    assert (v.moved_to / "why.txt").read_text() == v.why + "\n"
    assert verify_and_isolate(bad, "always") == Verdict(gone=True)
    assert entries(tmp_path / "encodings") == [fine]


def test_task_cache_through_the_cli_exit_codes(tmp_path):
    """The real ``python -m residual_exp task=cache``: config, validation, registry, exit code."""
    cache = Cache(tmp_path / "cache")
    cache.get_or_build("bases", {"b": 1}, _tensors, _load_tensors, suffix=".safetensors")
    entry = cache.path("bases", {"b": 1}, ".safetensors")
    _flip(entry, entry.stat().st_size - 8)
    cli = lambda *a: subprocess.run([sys.executable, "-m", "residual_exp", "task=cache",
                                     f"cache.dir={tmp_path / 'cache'}", *a],
                                    cwd=ROOT, capture_output=True, text=True, timeout=300)
    bad = cli("task.action=verify", "task.kinds=[bases]")
    assert bad.returncode == 1 and f"DAMAGED  bases/{entry.name}" in bad.stdout, bad.stdout + bad.stderr
    assert "0 of 1 entries OK, 1 damaged" in bad.stdout and not entry.exists()


# --- end to end ---------------------------------------------------------------------------------------
TINY = ["dataset.params.n_train=96", "dataset.params.n_val=48", "dataset.params.n_test=48",
        "dataset.params.n_reference=96", "model.pretrained=null", "trainer=fast", "trainer.max_epochs=2",
        "method=residual_fine", "logger=none", "resume=false"]


def test_damaged_encoding_does_not_change_the_result(tmp_path):
    from residual_exp.run import run
    cfg = compose_cfg(TINY, tmp_path)
    assert run(cfg) == 0
    first = json.loads((tmp_path / "run" / "results.json").read_text())
    for npy in sorted((tmp_path / "cache" / "encodings").glob("*/*.npy")):
        _flip(npy, npy.stat().st_size // 2)                          # every cached encoding, silently
    bases = sorted((tmp_path / "cache" / "bases").glob("*/*.safetensors"))
    assert bases
    for st in bases:
        _flip(st, st.stat().st_size - 8)                             # and every cached PCA basis
    cache_mod._verified.clear()                                      # as in a new process
    cfg = compose_cfg(TINY, tmp_path)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run2")
    assert run(cfg) == 0
    again = json.loads((tmp_path / "run2" / "results.json").read_text())
    strip = lambda rs: [{k: v for k, v in r.items() if k != "wall_seconds"} for r in rs]
    assert strip(again) == strip(first)
    assert list((tmp_path / "cache" / "encodings" / DAMAGED_DIR).iterdir())
    assert list((tmp_path / "cache" / "bases" / DAMAGED_DIR).iterdir())


# --- data rewritten in place --------------------------------------------------------------------------
def _image_folder(root, seed, ext):
    """2 classes x (3 train + 2 test) noisy images; BMP keeps every file's size fixed across rewrites."""
    from PIL import Image
    for c_i, c in enumerate(("golden_retriever", "tabby_cat")):
        for split, n in (("train", 3), ("test", 2)):
            for k in range(n):
                path = root / split / c / f"{k}.{ext}"
                path.parent.mkdir(parents=True, exist_ok=True)
                px = np.random.default_rng([seed, c_i, k, n]).integers(0, 256, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(px).save(path, format="BMP" if ext == "bmp" else "JPEG", quality=95)


def _encode_test_split(data_root, cache_root, content_hash):
    from residual_exp.backbones import build_backbone
    from residual_exp.data import vision
    from residual_exp.data.registry import build_split
    from residual_exp.encode import dataset_identity, encode_split, model_identity
    model = OmegaConf.create(dict(name="tiny_clip", family="tiny_clip", arch="tiny-clip", pretrained=None,
                                  weights=None, image_size=None, precision="auto", logit_scale=100.0,
                                  cache_dir=None, params={}))
    data = OmegaConf.create(dict(name="image_folder", root=str(data_root), download=False, batch_size=4,
                                 num_workers=0, skip_bad_images=False, content_hash=content_hash, params={}))
    torch.manual_seed(0)
    bb = build_backbone(model).double().eval()
    vision.clear_cache()                                             # a fresh open, as a new process does
    split = build_split(data, "test", bb.transform)
    ident = {"model": model_identity(model, 0), "dataset": dataset_identity(data, split, bb.transform)}
    enc = encode_split(bb, split, Cache(cache_root), ident, "cpu", 4, dtype="float64", progress=False)
    return np.array(enc.features), cache_root / "encodings"


@pytest.mark.parametrize("content_hash", [False, True])
def test_image_folder_rewritten_in_place_gives_new_encodings(tmp_path, content_hash):
    """Same names, same count, different pixels: a new cache key and encodings of the new pixels.
    With ``dataset.content_hash=true`` even a rewrite that keeps every size and mtime is caught."""
    import os
    ext = "bmp" if content_hash else "jpg"
    _image_folder(tmp_path / "data", seed=0, ext=ext)
    before, folder = _encode_test_split(tmp_path / "data", tmp_path / "cache", content_hash)
    stats = {p: p.stat() for p in (tmp_path / "data").rglob(f"*.{ext}")}
    _image_folder(tmp_path / "data", seed=1, ext=ext)                # rewritten in place
    if content_hash:                                                 # e.g. rsync -t / cp -p of other pixels
        for p, st in stats.items():
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert all(p.stat().st_size == st.st_size and p.stat().st_mtime_ns == st.st_mtime_ns
                   for p, st in stats.items())
    after, _ = _encode_test_split(tmp_path / "data", tmp_path / "cache", content_hash)
    entries = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(entries) == 2                                         # a new key; the old entry is not reused
    assert not np.allclose(after, before)
    fresh, _ = _encode_test_split(tmp_path / "data", tmp_path / "fresh_cache", content_hash)
    assert np.array_equal(after, fresh)                              # exactly what a clean cache gives
