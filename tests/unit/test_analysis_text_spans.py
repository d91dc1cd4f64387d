"""TextSpan/SOMP: checked against scikit-learn's OMP; dictionary handling; λ-run report end to end."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import orthogonal_mp

from residual_exp.analysis import text_spans as ts
from residual_exp.spectral import StreamingPCA


def _dictionary(t: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((t, d))
    return a / np.linalg.norm(a, axis=1, keepdims=True)                   # [T, d] unit-norm atoms


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_somp_on_one_signal_equals_sklearn_orthogonal_mp(seed: int) -> None:
    dct = _dictionary(200, 48, seed)
    y = np.random.default_rng(100 + seed).standard_normal(48)
    k = 8
    res = ts.somp(y[None], dct, k)
    path = orthogonal_mp(dct.T, y, n_nonzero_coefs=k, return_path=True)   # [T, k]: coefs after each step
    # same atoms in the same order: the atom added at step t is the new non-zero of path[:, t]
    order = []
    for t in range(path.shape[1]):
        new = [j for j in np.flatnonzero(path[:, t]) if j not in order]
        assert len(new) == 1
        order += new
    assert res.support == order
    ref = orthogonal_mp(dct.T, y, n_nonzero_coefs=k)
    ours = np.zeros(200)
    ours[res.support] = res.coef[0]
    np.testing.assert_allclose(ours, ref, atol=1e-10)
    np.testing.assert_allclose(res.residual[0], y - dct.T @ ref, atol=1e-10)
    assert np.all(np.diff(res.explained) >= -1e-12) and 0 < res.explained[-1] <= 1


def test_somp_recovers_a_planted_common_support() -> None:
    dct = _dictionary(300, 64, 7)
    rng = np.random.default_rng(8)
    support = [5, 77, 150, 299]
    x = rng.standard_normal((10, 4)) @ dct[support]                      # 10 signals on the same 4 atoms
    res = ts.somp(x, dct, 10)
    assert sorted(res.support) == sorted(support)                        # stops once the residual is 0
    assert res.explained[-1] == pytest.approx(1.0)
    # the residual after any step is orthogonal to the selected atoms (least-squares refit)
    part = ts.somp(x + 0.01 * rng.standard_normal(x.shape), dct, 2)
    assert np.abs(part.residual @ dct[part.support].T).max() < 1e-10


def test_somp_on_scaled_pcs_equals_somp_on_the_centred_data() -> None:
    """The TextSpan equivalence of the module docstring: images are not needed, the basis is enough."""
    rng = np.random.default_rng(3)
    n, d = 500, 24
    x = rng.standard_normal((n, 6)) @ rng.standard_normal((6, d)) + rng.standard_normal(d)   # rank-6 + mean
    dct = _dictionary(80, d, 4)
    on_data = ts.somp(x - x.mean(0), dct, 5)
    pca = StreamingPCA(1, d)
    pca.update(torch.from_numpy(x)[:, None])
    b = pca.finalize()
    scaled = (b.eigenvalues[0].clamp_min(0).sqrt()[:, None] * b.components[0]).numpy()       # [d, d]
    on_pcs = ts.somp(scaled, dct, 5)
    assert on_pcs.support == on_data.support
    np.testing.assert_allclose(on_pcs.explained, on_data.explained, atol=1e-8)


def test_dictionary_default_file_and_filter(tmp_path) -> None:
    texts = ts.default_dictionary()
    low = {t.lower() for t in texts}
    assert len(texts) == len(low)                                        # deduplicated
    for must in ("red", "striped", "top left", "a red shape", "an orange shape", "heart", "the number 7",
                 "goldfish", "forest", "checkered"):
        assert must in low, must
    assert "a orange shape" not in low
    f = tmp_path / "dict.txt"
    f.write_text("# comment\nred\n\n  blue  sky \nred\n")
    assert ts.load_dictionary(f) == ["red", "blue sky"]
    from residual_exp.errors import UserError
    with pytest.raises(UserError, match="missing.txt: no such file"):
        ts.load_dictionary(tmp_path / "missing.txt")
    for text, n in (("", 0), ("\n  \n# only a comment\n", 0), ("one\n", 1)):     # nothing to decompose onto
        f.write_text(text)
        with pytest.raises(UserError, match=f"holds {n} description"):
            ts.load_dictionary(f)
    kept, dropped = ts.filter_known(["red", "blue zebra", "a cross"], lambda t: {w for s in t for w in s.split()
                                                                            if w == "zebra"})
    assert kept == ["red", "a cross"] and dropped == ["blue zebra"]
    assert ts.filter_known(["x"], None) == (["x"], [])
    atoms = ts.prepare_dictionary(torch.randn(5, 8))
    assert torch.allclose(atoms.norm(dim=-1), torch.ones(5, dtype=atoms.dtype))


def test_unit_gains_and_lambda_rows() -> None:
    lam = torch.tensor([[1.0, 1.0, 5.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    eig = torch.tensor([[3.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    g = ts.unit_gains(lam, mask, eig)
    assert g[0] == pytest.approx(1.0)                                    # the masked λ = 5 does not count
    assert g[1] == pytest.approx(np.sqrt(4 / 2))
    rows = ts.lambda_components(lam, mask, eig, eig / 4, ["a", "b"], lam_init=torch.ones(2, 3))
    assert len(rows) == 5 and rows[2] == {"unit": "b", "pc": 0, "eigenvalue": 1.0, "evr": 0.25, "lambda": 2.0,
                                          "share": 1.0, "lambda_init": 1.0, "share_init": 0.25, "delta_share": 0.75}
    assert sum(r["share"] for r in rows if r["unit"] == "b") == pytest.approx(float(g[1]) ** 2 * 0.5)


def _fake_run(cfg, run_dir, layout, dim: int) -> None:
    """A residual_full run dir: lambda.safetensors ([S, K] λ and mask, unit names) + .hydra/config.yaml."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file
    units = [layout.names[i] for i in layout.indices("heads+mlps")]
    g = torch.Generator().manual_seed(0)
    lam = 1 + torch.randn(len(units), dim, generator=g)
    lam[units.index("L2H1"), 0] = 9.0                                      # a clearly amplified component
    from residual_exp.results import write_run_config
    run_dir.mkdir(parents=True)
    save_file({"lambda": lam, "mask": torch.ones(len(units), dim, dtype=torch.bool)},
              str(run_dir / "lambda.safetensors"), metadata={"method": "residual_full", "units": json.dumps(units)})
    write_run_config(OmegaConf.to_container(cfg, resolve=True), run_dir)


def test_text_spans_end_to_end_with_a_run(make_cfg, tmp_path) -> None:
    from tests.conftest import TINY_DATA
    from omegaconf import open_dict
    from residual_exp.decompose.units import UnitLayout
    from residual_exp.run import run
    run_dir = tmp_path / "trained"
    train_cfg = make_cfg(["method=residual_full", "model.pretrained=null", "logger=none",
                          "dataset=shapes_color", *TINY_DATA])
    with open_dict(train_cfg):
        train_cfg.paths.output_dir = str(run_dir)
    _fake_run(train_cfg, run_dir, UnitLayout.vit(4, 4), 64)
    dict_file = tmp_path / "dict.txt"
    dict_file.write_text("red\nblue\ngreen\na red shape\nstriped\ntop left\nsmall\ncircle\nzebra crossing\n")
    cfg = make_cfg(["task=analysis", "analysis=text_spans", "model.pretrained=null", "logger=none",
                    "analysis.progress=false", f"analysis.run_dir={run_dir}", f"analysis.dictionary={dict_file}",
                    "analysis.n_components=2", "analysis.n_descriptions=3", "analysis.n_lambda=4", *TINY_DATA])
    assert run(cfg) == 0
    out = tmp_path / "run"
    for f in ("text_spans.md", "text_spans_pcs.csv", "text_spans_units.csv", "lambda_units.csv",
              "lambda_components.csv", "lambda_all_components.csv", "lambda_gains.png",
              "dictionary_tiny_clip.txt", "dictionary_dropped_tiny_clip.txt"):
        assert (out / f).is_file(), f
    assert (out / "dictionary_dropped_tiny_clip.txt").read_text().split("\n")[0] == "zebra crossing"
    pcs = list(csv.DictReader(open(out / "text_spans_pcs.csv")))
    assert len(pcs) == 16 * 2 * 3 and {r["unit"] for r in pcs} == {f"L{l}H{h}" for l in range(4) for h in range(4)}
    assert "zebra crossing" not in {r["description"] for r in pcs}
    comps = list(csv.DictReader(open(out / "lambda_components.csv")))
    amplified = [r for r in comps if r["which"] == "amplified"]
    assert len(amplified) == 4 and (amplified[0]["unit"], amplified[0]["pc"]) == ("L2H1", "0")
    assert amplified[0]["descriptions"]
    assert "Most amplified components" in (out / "text_spans.md").read_text()


def test_analysis_without_a_name_lists_the_valid_ones(make_cfg, capsys) -> None:
    from residual_exp.run import run
    assert run(make_cfg(["task=analysis", "model.pretrained=null"])) == 2
    err = capsys.readouterr().err
    for name in ("intrinsic_dimension", "spectral_similarity", "coarse_selection", "text_spans"):
        assert name in err
