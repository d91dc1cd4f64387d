"""Text interpretation of units' principal components (TextSpan / simultaneous OMP).

Dictionary.  Descriptions (one per line of a user file, or :func:`default_dictionary`: every
dataset's class names from :mod:`residual_exp.data.metadata` that are static, the shapes
attributes, and common visual attribute words) are encoded by the model's text tower,
L2-normalised, and — by default — centred by their mean embedding and renormalised (the
mean text direction is shared by every description and would otherwise dominate).  Units
live in the same (output) space as the text embeddings for CLIP-like models, so their
principal directions can be read against the dictionary directly.

Decomposition.  :func:`somp` is simultaneous orthogonal matching pursuit on signals
``X [n, d]``: at each step pick the atom maximising Σ_i ⟨r_i, d_j⟩² (the atom along which
the residual varies most), then refit all signals by least squares on the selected atoms
and update the residual.  For one signal this is exactly OMP (scikit-learn's
``orthogonal_mp``, tested).  With ``X`` = a unit's centred outputs this is TextSpan
(Gandelsman et al. 2024, as restated in the ResiDual paper, App. A.2): TextSpan picks the atom
with the largest variance of the residual's projections and projects it out of the residual
(and the dictionary), which selects the same atoms as the criterion above.  Because
``XᵀX = Φᵀ diag((n−1)λ) Φ`` and projecting out atoms only multiplies it left and right by
the same projector, SOMP on the rows ``sqrt(λ_k) Φ_k`` (the unit's PCs scaled by their
standard deviations) selects *exactly* the atoms TextSpan selects on the data itself, so
the images are not needed: :func:`unit_spans` runs SOMP on the (EVR-pruned) scaled PCs,
:func:`component_descriptions` runs OMP on each PC alone (its coefficient's sign says which
end of the PC the description sits on).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import UserError
from ..spectral import PCABasis

__all__ = ["ATTRIBUTE_WORDS", "default_dictionary", "load_dictionary", "filter_known", "encode_texts",
           "prepare_dictionary", "SompResult", "somp", "component_descriptions", "unit_spans",
           "lambda_components", "unit_gains"]

# Common visual attribute words and phrases (kept short: small word-level vocabularies
# such as the tiny CLIP's know only a few hundred words; unknown ones are filtered out).
ATTRIBUTE_WORDS: dict[str, list[str]] = {
    "colour": ["red", "green", "blue", "yellow", "purple", "orange", "white", "cyan", "black", "gray",
               "brown", "pink", "magenta", "gold", "silver", "dark", "bright", "colorful",
               "black and white", "a red shape", "a green shape", "a blue shape", "a yellow shape",
               "a purple shape", "an orange shape", "a white shape", "a cyan shape"],
    "texture": ["plain", "striped", "dotted", "checkered", "banded", "blotchy", "braided", "bubbly", "bumpy",
                "chequered", "cobwebbed", "cracked", "crosshatched", "crystalline", "fibrous", "flecked",
                "freckled", "frilly", "gauzy", "grid", "grooved", "honeycombed", "interlaced", "knitted",
                "lacelike", "lined", "marbled", "matted", "meshed", "paisley", "perforated", "pitted",
                "pleated", "polka-dotted", "porous", "potholed", "scaly", "smeared", "spiralled", "sprinkled",
                "stained", "stratified", "studded", "swirly", "veined", "waffled", "woven", "wrinkled",
                "zigzagged", "smooth", "rough", "noisy", "a plain background", "a striped background",
                "a dotted background", "a checkered background"],
    "shape": ["circle", "square", "triangle", "star", "cross", "heart", "rectangle", "oval", "diamond",
              "hexagon", "line", "curve", "ring", "arrow", "a round shape", "a pointy shape"],
    "position": ["top left", "top right", "bottom left", "bottom right", "in the center", "at the top",
                 "at the bottom", "on the left", "on the right", "in the corner", "at the edge",
                 "in the top left corner", "in the top right corner", "in the bottom left corner",
                 "in the bottom right corner"],
    "size": ["small", "medium", "large", "tiny", "huge", "big", "a small shape", "a medium shape",
             "a large shape", "a close-up", "far away"],
    "count": ["one", "two", "three", "four", "many", "a single object", "a pair of objects",
              "a group of objects", "a crowd", "nothing"],
    "style": ["a photo", "a drawing", "a painting", "a sketch", "a cartoon", "a blurry photo",
              "a low contrast photo", "a high contrast photo", "at night", "in daylight", "text", "a logo"],
    "scene": ["indoors", "outdoors", "the sky", "water", "grass", "snow", "sand", "a city", "a forest",
              "a road", "a building", "a person", "an animal", "food", "a vehicle"],
}


def _dedupe(texts: Sequence[str]) -> list[str]:
    seen, out = set(), []
    for t in texts:
        t = " ".join(str(t).split())
        if t and t.lower() not in seen:
            seen.add(t.lower())
            out.append(t)
    return out


def default_dictionary() -> list[str]:
    """Class names of every dataset whose names are static, the shapes attributes, attribute words.

    Static class names (``residual_exp.data.metadata``): digits (MNIST/SVHN), ImageNet, GTSRB,
    EuroSAT, RESISC45.  CIFAR, DTD, Cars and SUN397 read their names from the data on disk, so
    they are not listed (DTD's textures are covered by the texture words).
    """
    from ..data import metadata
    from ..data.shapes import ATTRIBUTES
    texts: list[str] = []
    for words in ATTRIBUTE_WORDS.values():
        texts += words
    for attr, names in ATTRIBUTES.items():
        texts += list(names)
        phrase = {"shape": "{a} {n}", "color": "{a} {n} shape", "size": "{a} {n} shape", "position": "in the {n}",
                  "background": "{a} {n} background"}[attr]
        texts += [phrase.format(a="an" if n[0] in "aeiou" else "a", n=n) for n in names]
    texts += [f"the number {d}" for d in metadata.DIGITS]
    texts += list(metadata.EUROSAT.values())
    texts += metadata.clean_classnames(metadata.RESISC45_FOLDERS)
    texts += list(metadata.GTSRB)
    texts += list(metadata.IMAGENET)
    return _dedupe(texts)


def load_dictionary(path: str | Path) -> list[str]:
    """One description per line; blank lines and lines starting with ``#`` are skipped."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"analysis.dictionary={path}: no such file (one description per line)")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"analysis.dictionary={path}: not a readable text file ({type(e).__name__})") from None
    texts = _dedupe(line for line in lines if not line.lstrip().startswith("#"))
    if len(texts) < 2:
        raise UserError(f"analysis.dictionary={path}: holds {len(texts)} description{'' if len(texts) == 1 else 's'} "
                        "(blank lines and # comments are skipped); a dictionary needs at least 2, one per line")
    return texts


def filter_known(texts: Sequence[str], unknown_words: Callable[[list[str]], set] | None) -> tuple[list[str], list[str]]:
    """``(kept, dropped)``: drop descriptions with a word the tokenizer does not know.

    ``unknown_words(texts) -> set of words`` is the tokenizer's own check (the tiny CLIP's
    ``WordTokenizer.unknown_words``); ``None`` keeps everything (BPE tokenizers know all words).
    """
    if unknown_words is None:
        return list(texts), []
    kept, dropped = [], []
    for t in texts:
        (dropped if unknown_words([t]) else kept).append(t)
    return kept, dropped


@torch.no_grad()
def usable_dictionary(texts: Sequence[str], backbone, label: str, source: str) -> tuple[list[str], list[str], str]:
    """``(kept, dropped, message)``: the descriptions whose words ``backbone``'s tokenizer knows
    (a word-level tokenizer, as the tiny CLIP's, maps unknown words to one id)."""
    unknown = getattr(getattr(backbone, "_tokenizer", None), "unknown_words", None)
    kept, dropped = filter_known(texts, unknown)
    return kept, dropped, (f"{label}: dictionary {source}: {len(texts)} descriptions, {len(dropped)} dropped "
                           f"(words unknown to the tokenizer), {len(kept)} kept")


def encode_texts(backbone, texts: Sequence[str], device="cpu", batch_size: int = 256,
                 progress: bool = False) -> torch.Tensor:
    """``[T, D]`` L2-normalised text embeddings (float32, on CPU)."""
    out = []
    for i in tqdm(range(0, len(texts), batch_size), desc="encode dictionary", disable=not progress, leave=False):
        tokens = backbone.tokenize(list(texts[i:i + batch_size]))
        tokens = tokens.to(device) if torch.is_tensor(tokens) else {k: v.to(device) for k, v in tokens.items()}
        out.append(F.normalize(backbone.encode_text(tokens).float(), dim=-1).cpu())
    return torch.cat(out)


def prepare_dictionary(emb: torch.Tensor, center: bool = True) -> torch.Tensor:
    """Centre by the mean embedding (optional) and renormalise the rows → unit-norm atoms."""
    e = emb.double()
    if center:
        e = e - e.mean(0, keepdim=True)
    return F.normalize(e, dim=-1)


# --------------------------------------------------------------------------- SOMP
@dataclass
class SompResult:
    support: list[int]          # atom indices in selection order
    coef: np.ndarray            # [n, k] least-squares coefficients of the signals on the support
    explained: list[float]      # after each step, 1 − ‖R‖²/‖X‖² (cumulative fraction explained)
    residual: np.ndarray        # [n, d] final residual


def somp(signals, dictionary, n_atoms: int, tol: float = 1e-12) -> SompResult:
    """Simultaneous OMP of ``signals`` ``[n, d]`` on the unit-norm rows of ``dictionary`` ``[T, d]``.

    Step t: ``j = argmax_j Σ_i ⟨r_i, d_j⟩²`` over atoms not yet selected; then the
    coefficients of every signal on the selected atoms are refitted by least squares and
    ``R = X − C D_S``.  Stops early when the residual vanishes (‖R‖² ≤ tol·‖X‖²).  With n = 1
    this is OMP and equals ``sklearn.linear_model.orthogonal_mp(dictionary.T, x, n_nonzero_coefs=k)``.
    """
    x = np.atleast_2d(np.asarray(signals, dtype=np.float64))             # [n, d]
    dct = np.asarray(dictionary, dtype=np.float64)                       # [T, d]
    if dct.ndim != 2 or dct.shape[1] != x.shape[1]:
        raise ValueError(f"dictionary must be [T, d={x.shape[1]}], got {dct.shape}")
    k_max = min(int(n_atoms), dct.shape[0], x.shape[1])
    total = float((x * x).sum())
    support: list[int] = []
    explained: list[float] = []
    coef = np.zeros((x.shape[0], 0))
    r = x.copy()
    for _ in range(k_max):
        if total == 0 or float((r * r).sum()) <= tol * total:
            break
        score = ((r @ dct.T) ** 2).sum(0)                                # [T]
        score[support] = -np.inf
        support.append(int(np.argmax(score)))
        a = dct[support]                                                 # [k, d]
        coef = np.linalg.lstsq(a.T, x.T, rcond=None)[0].T                # [n, k]
        r = x - coef @ a                                                 # [n, d]
        explained.append(1.0 - float((r * r).sum()) / total if total else 0.0)
    return SompResult(support, coef, explained, r)


# --------------------------------------------------------------------------- units
def component_descriptions(basis: PCABasis, names: Sequence[str], atoms: torch.Tensor, texts: Sequence[str],
                           n_components: int = 5, n_descriptions: int = 5, progress: bool = False) -> list[dict]:
    """For each unit and each of its first ``n_components`` PCs: OMP on the PC alone.

    Rows: ``unit, pc, evr (of that PC), rank, description, coef, cosine`` where ``cosine`` is
    ⟨Φ_i, atom⟩ (its sign: the description sits on the + or − end of the PC).
    """
    dct = atoms.double().cpu().numpy()
    rows = []
    for u in tqdm(range(basis.num_units), desc="describe PCs", disable=not progress, leave=False):
        for i in range(min(n_components, basis.num_components)):
            if not bool(basis.mask[u, i]) or float(basis.eigenvalues[u, i]) <= 0:
                continue
            phi = basis.components[u, i].double().cpu().numpy()          # [d]
            res = somp(phi[None], dct, n_descriptions)
            for rank, (j, c) in enumerate(zip(res.support, res.coef[0])):
                rows.append({"unit": names[u], "pc": i, "evr": float(basis.explained_variance_ratio[u, i]),
                             "rank": rank, "description": texts[j], "coef": float(c),
                             "cosine": float(phi @ dct[j])})
    return rows


def unit_spans(basis: PCABasis, names: Sequence[str], atoms: torch.Tensor, texts: Sequence[str],
               n_descriptions: int = 5, evr: float | None = 0.99, progress: bool = False) -> list[dict]:
    """Per unit, SOMP (= TextSpan, see the module docstring) on its scaled PCs ``sqrt(λ_k) Φ_k``.

    Rows: ``unit, rank, description, explained`` (cumulative fraction of the unit's variance
    within the kept PCs explained by the descriptions selected so far), ``n_pcs``.
    """
    b = basis.prune(evr=evr) if evr is not None else basis
    dct = atoms.double().cpu().numpy()
    rows = []
    for u in tqdm(range(b.num_units), desc="TextSpan/SOMP", disable=not progress, leave=False):
        keep = b.mask[u] & (b.eigenvalues[u] > 0)
        if not bool(keep.any()):
            continue
        x = (b.eigenvalues[u][keep].double().sqrt()[:, None] * b.components[u][keep].double()).cpu().numpy()
        res = somp(x, dct, n_descriptions)
        for rank, (j, e) in enumerate(zip(res.support, res.explained)):
            rows.append({"unit": names[u], "rank": rank, "description": texts[j], "explained": e,
                         "n_pcs": int(keep.sum())})
    return rows


def unit_gains(lam: torch.Tensor, mask: torch.Tensor, eigenvalues: torch.Tensor) -> torch.Tensor:
    """``[S]``: sqrt(Σ_k λ_k² e_k / Σ_k e_k) over kept components: the factor by which the
    unit's standard deviation is scaled (1 for λ = 1; components with no variance do not count)."""
    e = torch.where(mask, eigenvalues.double().clamp_min(0), torch.zeros_like(eigenvalues, dtype=torch.float64))
    num = (lam.double() ** 2 * e).sum(1)
    den = e.sum(1)
    return torch.where(den > 0, (num / torch.where(den > 0, den, torch.ones_like(den))).sqrt(),
                       torch.full_like(den, float("nan")))


def lambda_components(lam: torch.Tensor, mask: torch.Tensor, eigenvalues: torch.Tensor, evr: torch.Tensor,
                      names: Sequence[str], lam_init: torch.Tensor | None = None) -> list[dict]:
    """One row per kept component: ``unit, pc, eigenvalue, evr, lambda, share[, lambda_init, share_init,
    delta_share]``.

    ``share = λ² · evr`` is the component's variance after reweighting as a fraction of its unit's
    original variance (so Σ_k share = gain²); ``delta_share = (λ² − λ_init²) · evr`` is what training
    added (> 0, amplified) or removed (< 0, suppressed).  A large λ on a PC with almost no variance
    changes little; a moderate λ on a dominant PC changes a lot: ranking by ``delta_share`` says which.
    """
    rows = []
    for s, k in mask.nonzero().tolist():
        e = float(evr[s, k])
        row = {"unit": names[s], "pc": k, "eigenvalue": float(eigenvalues[s, k]), "evr": e,
               "lambda": float(lam[s, k]), "share": float(lam[s, k]) ** 2 * e}
        if lam_init is not None:
            row["lambda_init"] = float(lam_init[s, k])
            row["share_init"] = float(lam_init[s, k]) ** 2 * e
            row["delta_share"] = row["share"] - row["share_init"]
        rows.append(row)
    return rows


def report_lines(names: Sequence[str], pc_rows: Sequence[dict], span_rows: Sequence[dict],
                 n_components: int) -> list[str]:
    """Markdown lines: per unit its SOMP descriptions, then per principal component its OMP ones."""
    lines = ["## Per unit (TextSpan/SOMP on the scaled PCs)", ""]
    for n in names:
        sel = [r for r in span_rows if r["unit"] == n]
        if sel:
            lines.append(f"- **{n}** ({sel[0]['n_pcs']} PCs): " + "; ".join(
                f"{r['description']} ({r['explained']:.0%})" for r in sel))
    lines += ["", "## Per principal component (OMP; sign = end of the PC)", ""]
    for n in names:
        for pc in range(n_components):
            sel = [r for r in pc_rows if r["unit"] == n and r["pc"] == pc]
            if sel:
                lines.append(f"- {n} PC{pc} (EVR {sel[0]['evr']:.2f}): " + ", ".join(
                    f"{'+' if r['cosine'] >= 0 else '−'}{r['description']}" for r in sel))
    return lines + [""]
