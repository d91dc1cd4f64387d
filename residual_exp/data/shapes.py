"""Embedded synthetic ``shapes`` data: small RGB images of one shape with independent attributes.

Every image shows exactly one anti-aliased shape on a textured background. Five attributes
are sampled uniformly and independently per image:

=============  ==============================================================================
attribute      class names (label = index in this list, see :data:`ATTRIBUTES`)
=============  ==============================================================================
``shape``      circle, square, triangle, star, cross, heart
``color``      red, green, blue, yellow, purple, orange, white, cyan
``size``       small, medium, large   (shape extent ≈ 22% / 33% / 46% of the image side)
``position``   top left, top right, bottom left, bottom right   (quadrant of the shape centre)
``background`` plain, striped, dotted, checkered   (dark/greyish palette, never a shape colour)
=============  ==============================================================================

Nuisance variation on top of the labels: ±8% scale, ±12° rotation, quarter-pixel position
jitter inside the quadrant (small shapes stay fully inside it; large ones sit near its
centre), per-image shape-colour jitter, texture period/phase/orientation/colour jitter and
small per-pixel noise.

Splits and determinism. Image ``i`` of split ``s`` depends only on ``(seed, s, i)`` (and
``image_size`` for the pixels; the attributes do not depend on it): images are drawn in
fixed chunks of :data:`CHUNK` from ``np.random.default_rng([seed, split_id, chunk])``, so
``generate(n)[:m] == generate(m)`` byte for byte and the splits ``train | val | test |
reference`` (plus ``pretrain`` for the caption data) come from disjoint seed streams.
``reference`` plays ImageNet's role in the paper (fitting the PCA bases).

Registered classification datasets (one per attribute, all on the *same* image stream,
only the label differs): ``shapes_shape``, ``shapes_color``, ``shapes_size``,
``shapes_position``, ``shapes_background``. ``cfg.params``: ``n_train`` (5000), ``n_val``
(1000), ``n_test`` (2000), ``n_reference`` (5000), ``seed`` (0), ``image_size`` (32).

Rendering is vectorised numpy: each (shape, size, scale, rotation) is rasterised once at
4× supersampling into a template bank holding every quarter-pixel offset, box-downsampled;
images are then pasted from that bank, so 30k images take a few seconds on one core.

Fingerprint. A split's data fingerprint (cache keys) is its generator parameters plus
:data:`GENERATOR_VERSION`: bump that constant whenever a change here alters any pixel or
label of ``generate`` (``tests/unit/test_data_integrity.py::test_shapes_generator_is_frozen``
pins a checksum).
:func:`generate_labels` draws the labels alone, without rendering.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .integrity import Synthetic
from .registry import ClassificationSplit

__all__ = [
    "ATTRIBUTES", "TEMPLATES", "SPLIT_IDS", "CHUNK", "COLOR_RGB",
    "generate", "generate_labels", "make_captions", "ShapesCaptions", "load_split",
    "GENERATOR_VERSION",
]

GENERATOR_VERSION = 1                # bump when generate() output (pixels or labels) changes

# ---------------------------------------------------------------------------------------
# attributes, class names, prompt templates
# ---------------------------------------------------------------------------------------

ATTRIBUTES: dict[str, list[str]] = {
    "shape": ["circle", "square", "triangle", "star", "cross", "heart"],
    "color": ["red", "green", "blue", "yellow", "purple", "orange", "white", "cyan"],
    "size": ["small", "medium", "large"],
    "position": ["top left", "top right", "bottom left", "bottom right"],
    "background": ["plain", "striped", "dotted", "checkered"],
}

# CLIP-style prompt templates, one ``{}`` each; phrased so that no article precedes the
# class name where a name could start with a vowel ("orange").
TEMPLATES: dict[str, list[str]] = {
    "shape": ["a {}.", "a photo of a {}.", "a drawing of a {}.", "a picture of a {}.",
              "a {} shape."],
    "color": ["the {} shape.", "a shape coloured {}.", "something {}.",
              "a photo of something {}.", "a drawing in {}."],
    "size": ["a {} shape.", "a {} object.", "something {}.", "a photo of a {} shape."],
    "position": ["a shape in the {}.", "something in the {} of the image.",
                 "an object at the {}.", "a photo of a shape in the {}."],
    "background": ["a shape on a {} background.", "a {} background.",
                   "something in front of a {} background.", "a photo with a {} background."],
}

# saturated, bright shape colours (uint8 RGB), far from the dark/grey background palette
COLOR_RGB = np.array([
    [230, 40, 40],     # red
    [40, 200, 60],     # green
    [50, 90, 245],     # blue
    [240, 220, 40],    # yellow
    [165, 60, 225],    # purple
    [250, 140, 20],    # orange
    [245, 245, 245],   # white
    [40, 220, 230],    # cyan
], dtype=np.float32)

SPLIT_IDS = {"train": 0, "val": 1, "test": 2, "reference": 3, "pretrain": 4}
CHUNK = 256                          # images per seed stream chunk (fixed: part of the format)
SIZE_FRAC = (0.22, 0.33, 0.46)       # shape extent / image side, per size class
SCALE_JITTER = (0.92, 1.0, 1.08)     # multiplicative size jitter (template levels)
ROT_JITTER = (-12.0, -6.0, 0.0, 6.0, 12.0)   # rotation jitter in degrees (template levels)
SUPERSAMPLE = 4                      # anti-aliasing factor per axis; also sub-pixel offsets
COLOR_JITTER = 8.0                   # ± per channel on the shape colour
NOISE = 4                            # ± integer per-pixel noise

_ATTR_ORDER = tuple(ATTRIBUTES)      # shape, color, size, position, background
_CAPTION_STREAM = 1 << 30            # seed-stream key of the captions (no chunk gets there)


# ---------------------------------------------------------------------------------------
# shape rasterisation (normalised frame: x right, y up, shape within about [-1, 1]^2)
# ---------------------------------------------------------------------------------------

def _inside(shape: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean mask of the points (x, y) inside shape ``shape`` (normalised frame)."""
    name = ATTRIBUTES["shape"][shape]
    ax, ay = np.abs(x), np.abs(y)
    if name == "circle":
        return x * x + y * y <= 0.9 ** 2
    if name == "square":
        return np.maximum(ax, ay) <= 0.8
    if name == "triangle":           # apex (0, .9), base corners (±.95, -.75)
        return (y >= -0.75) & (y <= 0.9 - (1.65 / 0.95) * ax)
    if name == "star":               # 5 points, outer radius 1, inner .5, centred vertically
        y = y + 0.095
        rho = np.hypot(x, y)
        k = 2 * math.pi / 5
        phi = np.mod(np.arctan2(x, y), k)            # angle from the upward axis
        phi = np.minimum(phi, k - phi)               # fold onto [0, pi/5]
        px, py = rho * np.cos(phi), rho * np.sin(phi)
        # edge from the outer tip A=(1, 0) to the inner corner B=(r cos36, r sin36)
        bx, by = 0.5 * math.cos(k / 2), 0.5 * math.sin(k / 2)
        cross = (bx - 1.0) * py - by * (px - 1.0)    # same sign as the origin's (-by*-1 > 0)
        return cross >= 0
    if name == "cross":
        return ((ax <= 0.32) & (ay <= 0.95)) | ((ay <= 0.32) & (ax <= 0.95))
    if name == "heart":              # (X^2 + Y^2 - 1)^3 - X^2 Y^3 <= 0
        X, Y = 1.2 * x, 1.2 * y + 0.12
        return (X * X + Y * Y - 1.0) ** 3 - X * X * Y ** 3 <= 0
    raise ValueError(name)


@functools.lru_cache(maxsize=4)
def _template_bank(image_size: int) -> tuple[tuple[np.ndarray, float, float], ...]:
    """Per size class: ``(bank, C, ext)``.

    ``bank`` uint8 alpha ``[n_shape, n_scale, n_rot, S, S, T, T]``; ``bank[..., oy, ox, :, :]``
    is the template cropped at sub-pixel offset ``(oy, ox)``, in which the shape centre lies
    at pixel coordinate ``C - o / S`` per axis. ``ext`` bounds, over all templates, the
    distance (px, per axis) from the centre to the far side of any covered pixel.
    """
    S = SUPERSAMPLE
    banks = []
    for frac in SIZE_FRAC:
        half = 0.5 * frac * image_size                     # half extent in pixels
        r_max = half * max(SCALE_JITTER) * math.sqrt(2)    # bound incl. rotation
        T = int(math.ceil(2 * r_max + 2))
        C = (T + 1) / 2.0                                  # centre of the (T+1)-px canvas
        M = (T + 1) * S
        g = (np.arange(M, dtype=np.float64) + 0.5) / S - C  # sub-pixel centres, px from C
        gx, gy = np.meshgrid(g, g)                          # [M, M] each (row = y down)
        n_shape, n_sc, n_rot = len(ATTRIBUTES["shape"]), len(SCALE_JITTER), len(ROT_JITTER)
        bank = np.empty((n_shape, n_sc, n_rot, S, S, T, T), dtype=np.uint8)
        for si, sc in enumerate(SCALE_JITTER):
            for ri, deg in enumerate(ROT_JITTER):
                t = math.radians(deg)
                c, s = math.cos(t), math.sin(t)
                # rotate image coordinates, flip y to point up, normalise by the half extent
                x = (c * gx + s * gy) / (half * sc)
                y = -(-s * gx + c * gy) / (half * sc)
                for k in range(n_shape):
                    sup = _inside(k, x, y).astype(np.float32)           # [M, M]
                    for oy in range(S):
                        for ox in range(S):
                            crop = sup[oy:oy + T * S, ox:ox + T * S]     # [T*S, T*S]
                            a = crop.reshape(T, S, T, S).mean(axis=(1, 3))  # [T, T]
                            bank[k, si, ri, oy, ox] = np.rint(a * 255).astype(np.uint8)
        ext = 0.0
        for o in range(S):                                  # covered-pixel extent per offset
            rows = np.flatnonzero(bank[:, :, :, o].max(axis=(0, 1, 2, 3, 5)))     # [k]
            cols = np.flatnonzero(bank[:, :, :, :, o].max(axis=(0, 1, 2, 3, 4)))  # [k]
            ctr = C - o / S
            ext = max(ext, ctr - rows[0], rows[-1] + 1 - ctr, ctr - cols[0], cols[-1] + 1 - ctr)
        banks.append((bank, C, ext))
    return tuple(banks)


# ---------------------------------------------------------------------------------------
# backgrounds
# ---------------------------------------------------------------------------------------

def _backgrounds(kind: np.ndarray, u: np.ndarray, H: int, W: int):
    """Background textures as ``(c1 [n, 3], dc [n, 3], pat [n, H, W])``, float32.

    The background image is ``c1 + pat * dc`` (0..255; ``pat`` in [0, 1] selects between the
    dark base colour ``c1`` and the lighter texture colour ``c1 + dc``). ``kind`` ``[n]``
    background labels; ``u`` ``[n, 9]`` uniforms for colour/texture jitter.
    """
    n = len(kind)
    u = u.astype(np.float32)                             # keep everything in float32
    scale = np.float32(H / 32.0)
    ys = (np.arange(H, dtype=np.float32) + 0.5)[None, :, None]   # pixel centres [1, H, 1]
    xs = (np.arange(W, dtype=np.float32) + 0.5)[None, None, :]   #               [1, 1, W]
    base = 30.0 + 50.0 * u[:, 0:1]                       # dark grey level        [n, 1]
    tint = (u[:, 1:4] - 0.5) * 20.0                      # ±10 per channel        [n, 3]
    c1 = base + tint                                     #                        [n, 3]
    dc = np.repeat(35.0 + 25.0 * u[:, 4:5], 3, axis=1)   # lighter second colour  [n, 3]
    period = scale * (4.0 + 3.0 * u[:, 5])               # texture period in px   [n]
    p = period[:, None, None]                            #                        [n, 1, 1]
    ph_x = u[:, 6, None, None] * p                       # texture phase          [n, 1, 1]
    ph_y = u[:, 7, None, None] * p
    pat = np.zeros((n, H, W), dtype=np.float32)
    names = ATTRIBUTES["background"]

    def frac(v):
        return v - np.floor(v)

    m = kind == names.index("striped")
    if m.any():
        theta = np.floor(u[m, 8] * 4) * np.float32(np.pi / 4)      # 0°, 45°, 90°, 135°
        t = (xs * np.cos(theta)[:, None, None] + ys * np.sin(theta)[:, None, None]
             + ph_x[m]) / p[m]                                      # [m, H, W]
        d = (np.abs(frac(t) - 0.5) - 0.25) * p[m]        # signed px distance to the band edge
        pat[m] = np.clip(0.5 - d, 0.0, 1.0)              # anti-aliased band
    m = kind == names.index("dotted")
    if m.any():                                          # separable: dx [m,1,W], dy [m,H,1]
        dx = (frac((xs + ph_x[m]) / p[m]) - 0.5) * p[m]
        dy = (frac((ys + ph_y[m]) / p[m]) - 0.5) * p[m]
        r = 0.28 * p[m]
        pat[m] = np.clip(r + 0.5 - np.sqrt(dx * dx + dy * dy), 0.0, 1.0)   # anti-aliased dot
    m = kind == names.index("checkered")
    if m.any():                                          # parity of column + row cell
        fx = frac((xs + ph_x[m]) / (2 * p[m])) < 0.5     # [m, 1, W]
        fy = frac((ys + ph_y[m]) / (2 * p[m])) < 0.5     # [m, H, 1]
        pat[m] = fx ^ fy
    # plain: pat stays 0; lift its colour a little so plain is not always the darkest
    plain = kind == names.index("plain")
    c1 = np.where(plain[:, None], c1 + 20.0 * u[:, 4:5], c1)
    return c1.astype(np.float32), dc.astype(np.float32), pat


# ---------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------

def _chunk(seed: int, split_id: int, c: int, image_size: int):
    """Render chunk ``c`` (``CHUNK`` images) of a split: images, attrs, alpha."""
    rng = np.random.default_rng([seed, split_id, c])
    n, H = CHUNK, image_size
    S = SUPERSAMPLE
    # --- labels (independent, uniform) and unit-scale nuisance draws; fixed draw order
    attrs = {a: rng.integers(0, len(ATTRIBUTES[a]), n) for a in _ATTR_ORDER}
    sc_i = rng.integers(0, len(SCALE_JITTER), n)
    rot_i = rng.integers(0, len(ROT_JITTER), n)
    jit = rng.random((n, 2))                           # position jitter in [0, 1)
    col_u = rng.random((n, 3))                         # shape colour jitter
    bg_u = rng.random((n, 9))                          # background jitter
    noise = rng.integers(-NOISE, NOISE + 1, (n, 3, H, H), dtype=np.int8)   # [n, 3, H, W]

    # --- shape centres: quadrant centre + jitter keeping every covered pixel inside the
    #     quadrant where there is room (small, medium); large ones stay near its centre
    banks = _template_bank(H)
    q = attrs["position"]
    ext = np.array([b[2] for b in banks])[attrs["size"]]            # [n]
    room = np.maximum(H / 4 - ext - 0.5 / S, 0.5)                   # jitter radius in px [n]
    cy = H / 4 + (q >= 2) * (H / 2) + (2 * jit[:, 0] - 1) * room
    cx = H / 4 + (q % 2) * (H / 2) + (2 * jit[:, 1] - 1) * room

    # --- paste alpha templates per size class (different template sides T)
    alpha = np.zeros((n, H, H), dtype=np.uint8)
    for size, (bank, C, _) in enumerate(banks):
        idx = np.flatnonzero(attrs["size"] == size)
        if len(idx) == 0:
            continue
        T = bank.shape[-1]
        # quarter-pixel quantised placement: top - o/S == centre - C
        ky = np.rint((cy[idx] - C) * S).astype(np.int64)
        kx = np.rint((cx[idx] - C) * S).astype(np.int64)
        top, left = -((-ky) // S), -((-kx) // S)       # ceil(k / S)
        oy, ox = top * S - ky, left * S - kx           # in [0, S)
        tmpl = bank[attrs["shape"][idx], sc_i[idx], rot_i[idx], oy, ox]   # [m, T, T]
        canvas = np.zeros((len(idx), H + 2 * T, H + 2 * T), dtype=np.uint8)
        rows = (top + T)[:, None] + np.arange(T)        # [m, T]
        cols = (left + T)[:, None] + np.arange(T)       # [m, T]
        canvas[np.arange(len(idx))[:, None, None], rows[:, :, None], cols[:, None, :]] = tmpl
        alpha[idx] = canvas[:, T:T + H, T:T + H]

    # --- composite per channel (contiguous [n, H, W] planes; a trailing axis of 3 is slow):
    #     background * (1 - a) + colour * a + noise, rounded
    c1, dc, pat = _backgrounds(attrs["background"], bg_u, H, H)            # [n,3] [n,3] [n,H,H]
    col = COLOR_RGB[attrs["color"]] + (2 * col_u - 1).astype(np.float32) * COLOR_JITTER  # [n, 3]
    a = alpha.astype(np.float32) * np.float32(1.0 / 255.0)                 # [n, H, H]
    images = np.empty((n, H, H, 3), dtype=np.uint8)
    for ch in range(3):
        bg = c1[:, ch, None, None] + pat * dc[:, ch, None, None]           # [n, H, H]
        img = bg + a * (col[:, ch, None, None] - bg) + noise[:, ch] + np.float32(0.5)
        images[..., ch] = np.clip(img, 0, 255.4)                           # truncation = round
    return images, attrs, alpha


def generate(n: int, seed: int = 0, split: str = "train", image_size: int = 32, *,
             return_alpha: bool = False):
    """Generate the first ``n`` images of ``split``.

    Returns ``(images, attrs)``: ``images`` uint8 ``[n, H, W, 3]`` (``H == W ==
    image_size``), ``attrs`` ``{attribute: int64 labels [n]}`` indexing :data:`ATTRIBUTES`.
    With ``return_alpha=True`` also the shape coverage, uint8 ``[n, H, W]`` (255 = fully
    inside the shape), for tests and analyses.
    """
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; valid: {tuple(SPLIT_IDS)}")
    if n < 0 or seed < 0 or image_size < 8:
        raise ValueError(f"need n >= 0, seed >= 0, image_size >= 8 (got {n}, {seed}, {image_size})")
    n_chunks = -(-n // CHUNK)
    parts = [_chunk(int(seed), SPLIT_IDS[split], c, int(image_size)) for c in range(n_chunks)]
    H = int(image_size)
    if not parts:
        empty = {a: np.zeros(0, dtype=np.int64) for a in _ATTR_ORDER}
        out = (np.zeros((0, H, H, 3), np.uint8), empty)
        return out + (np.zeros((0, H, H), np.uint8),) if return_alpha else out
    images = np.concatenate([p[0] for p in parts])[:n]
    attrs = {a: np.concatenate([p[1][a] for p in parts])[:n] for a in _ATTR_ORDER}
    if return_alpha:
        return images, attrs, np.concatenate([p[2] for p in parts])[:n]
    return images, attrs


def generate_labels(n: int, seed: int = 0, split: str = "train") -> dict[str, np.ndarray]:
    """The ``attrs`` of :func:`generate` (same values) without rendering any image."""
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; valid: {tuple(SPLIT_IDS)}")
    if n < 0 or seed < 0:
        raise ValueError(f"need n >= 0, seed >= 0 (got {n}, {seed})")
    parts = []
    for c in range(-(-n // CHUNK)):
        rng = np.random.default_rng([int(seed), SPLIT_IDS[split], c])   # same draws as _chunk
        parts.append({a: rng.integers(0, len(ATTRIBUTES[a]), CHUNK) for a in _ATTR_ORDER})
    if not parts:
        return {a: np.zeros(0, dtype=np.int64) for a in _ATTR_ORDER}
    return {a: np.concatenate([p[a] for p in parts])[:n] for a in _ATTR_ORDER}


@functools.lru_cache(maxsize=16)
def load_split(seed: int, split: str, n: int, image_size: int):
    """Memoised :func:`generate` (read-only arrays), shared by all ``shapes_*`` datasets."""
    images, attrs = generate(n, seed, split, image_size)
    images.setflags(write=False)
    for v in attrs.values():
        v.setflags(write=False)
    return images, attrs


# ---------------------------------------------------------------------------------------
# captions (contrastive pretraining)
# ---------------------------------------------------------------------------------------

_PREFIXES = ("", "", "", "a photo of ", "an image of ", "a drawing of ", "a picture of ",
             "there is ")
_NOUNS = ("shape", "object", "figure")
_BG_PHRASES = ("on a {} background", "against a {} background", "with a {} background",
               "over a {} background")
_POS_PHRASES = ("in the {}", "in the {} corner", "at the {}")
_COLOR_POST = ("coloured {}", "in {}")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_captions(attrs: dict[str, np.ndarray], rng: np.random.Generator) -> list[str]:
    """One caption per image mentioning a random non-empty subset of its attributes.

    E.g. "a small red circle on a striped background in the top left", "a purple star",
    "in the bottom right, a large shape", "a drawing of a green square against a plain
    background". Only true attribute values are ever mentioned.
    """
    n = len(attrs["shape"])
    subset = rng.integers(1, 2 ** len(_ATTR_ORDER), n)   # non-empty subset bitmask   [n]
    r = rng.integers(0, 1 << 30, (n, 7))                 # per-caption phrasing choices
    caps = []
    for i in range(n):
        on = {a: bool(subset[i] >> b & 1) for b, a in enumerate(_ATTR_ORDER)}
        name = {a: ATTRIBUTES[a][int(attrs[a][i])] for a in _ATTR_ORDER}
        color_post = on["color"] and r[i, 0] % 5 == 0    # "a circle coloured red"
        adjs = [name["size"]] if on["size"] else []
        if on["color"] and not color_post:
            adjs.append(name["color"])
        noun = name["shape"] if on["shape"] else _NOUNS[r[i, 1] % len(_NOUNS)]
        words = adjs + [noun]
        np_ = f"{_article(words[0])} {' '.join(words)}"
        if color_post:
            np_ += " " + _COLOR_POST[r[i, 2] % len(_COLOR_POST)].format(name["color"])
        post = []
        if on["background"]:
            post.append(_BG_PHRASES[r[i, 3] % len(_BG_PHRASES)].format(name["background"]))
        pos = _POS_PHRASES[r[i, 4] % len(_POS_PHRASES)].format(name["position"])
        if on["position"] and r[i, 5] % 4 == 0:          # front-loaded position
            prefix = f"{pos}, "
        else:
            prefix = _PREFIXES[r[i, 5] % len(_PREFIXES)]
            if on["position"]:
                post.append(pos)
        if r[i, 6] % 2:
            post.reverse()
        caps.append(" ".join([prefix + np_] + post))
    return caps


class ShapesCaptions(Dataset):
    """Image-caption pairs for contrastive pretraining, from the ``pretrain`` stream.

    Items are ``(image, caption)``: ``image`` a uint8 tensor ``[3, H, W]``, or
    ``transform(PIL image)`` when a transform is given. ``attrs`` and ``captions`` hold all
    labels and captions, deterministic in ``(n, seed, image_size)``.
    """

    def __init__(self, n: int, seed: int = 0, image_size: int = 32,
                 transform: Callable | None = None, split: str = "pretrain"):
        self.images, self.attrs = generate(n, seed, split, image_size)     # [n, H, W, 3]
        rng = np.random.default_rng([seed, SPLIT_IDS[split], _CAPTION_STREAM])
        self.captions = make_captions(self.attrs, rng)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int):
        img = self.images[i]
        if self.transform is not None:
            return self.transform(Image.fromarray(img)), self.captions[i]
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))), self.captions[i]  # [3, H, W]


# ---------------------------------------------------------------------------------------
# registry: one classification dataset per attribute
# ---------------------------------------------------------------------------------------

_DEFAULT_N = {"train": 5000, "val": 1000, "test": 2000, "reference": 5000}


def _load_item(targets: np.ndarray, images: np.ndarray, i: int):
    """``ClassificationSplit`` loader: ``(PIL image, label)`` (picklable via ``partial``)."""
    return Image.fromarray(images[i]), int(targets[i])


def _split_params(cfg, split: str) -> tuple[int, int, int]:
    params = cfg.get("params", None) or {}
    return (int(params.get(f"n_{split}", _DEFAULT_N[split])), int(params.get("seed", 0)),
            int(params.get("image_size", 32)))


def _make_builder(attribute: str):
    def build(cfg, split: str, transform: Callable | None = None) -> ClassificationSplit:
        n, seed, image_size = _split_params(cfg, split)
        images, attrs = load_split(seed, split, n, image_size)
        targets = attrs[attribute]
        prov = Synthetic("shapes", GENERATOR_VERSION,
                         {"attribute": attribute, "split": split, "n": n, "seed": seed,
                          "image_size": image_size, "chunk": CHUNK})
        return ClassificationSplit(
            base=images, indices=None, targets=targets,
            classnames=ATTRIBUTES[attribute], templates=TEMPLATES[attribute],
            name=cfg.name, split=split, transform=transform,
            load=functools.partial(_load_item, targets), provenance=prov)
    build.__name__ = f"build_shapes_{attribute}"
    return build


def _make_labels(attribute: str):
    def labels(cfg, split: str) -> np.ndarray:
        n, seed, _ = _split_params(cfg, split)
        return generate_labels(n, seed, split)[attribute]
    labels.__name__ = f"labels_shapes_{attribute}"
    return labels


# the builders the dataset configs name (conf/dataset/shapes_<attribute>.yaml: spec.builder / spec.labels)
build_shape, build_color, build_size, build_position, build_background = map(_make_builder, _ATTR_ORDER)
labels_shape, labels_color, labels_size, labels_position, labels_background = map(_make_labels, _ATTR_ORDER)
