"""The shape of a model's units without weights: layers, heads, head_dim, width, output dim, input
size, patch, and the readout (``task=plan`` sizes a cache with it).  The image tower is built on
the meta device (nothing allocated, read or downloaded), so any ``model=timm`` / ``model=open_clip``
architecture can be planned, not only the presets whose config states it (``model.spec``)."""
from __future__ import annotations

import torch


def arch_shape(model_cfg) -> tuple:
    """``(L, H, Dh, W, D, image size, patch, pool channels)`` of ``model_cfg`` (open_clip or timm
    family); pool channels: the attention pool's heads J (MAP readouts), else 0."""
    from .timm_backbone import TimmTower, input_grid
    size = model_cfg.get("image_size")
    params = dict(model_cfg.get("params") or {})
    with torch.device("meta"):
        if model_cfg.family == "timm":
            import timm
            kwargs = {"num_classes": 0, **dict(params.get("create_kwargs") or {})}
            if size:
                kwargs["img_size"] = int(size)
            model = timm.create_model(model_cfg.arch, pretrained=False, **kwargs)
            tower, dim = TimmTower(model), None
        elif model_cfg.family == "open_clip":
            import open_clip
            from open_clip.model import _build_vision_tower
            from open_clip.timm_model import TimmModel

            from .open_clip_backbone import _timm_head_linears, check_open_clip_config, check_open_clip_vision
            cfg = open_clip.get_model_config(model_cfg.arch)
            check_open_clip_config(model_cfg.arch, cfg)
            vcfg = dict(cfg["vision_cfg"], **({"image_size": int(size)} if size else {}))
            visual = _build_vision_tower(cfg["embed_dim"], vcfg)
            check_open_clip_vision(visual, model_cfg.arch)
            if isinstance(visual, TimmModel):
                model, tower = visual.trunk, TimmTower(visual.trunk)
                linears = _timm_head_linears(visual)
                dim = linears[-1].out_features if linears else None
            else:
                blocks = visual.transformer.resblocks
                W, H = visual.transformer.width, blocks[0].attn.num_heads
                D = visual.proj.shape[1] if visual.proj is not None else W
                img, patch = visual.image_size, visual.patch_size
                return (len(blocks), H, W // H, W, D, _first(img), _first(patch), 0)
        else:
            raise KeyError(f"no shape for model.family={model_cfg.family!r}")
    J = model.attn_pool.num_heads if tower.pool.kind == "map" else 0
    if dim is None:
        dim = model.attn_pool.out_features if J else tower.width
    size, patch = input_grid(model)
    return (tower.num_layers, tower.num_heads, tower.head_dim, tower.width, dim, size, patch, J)


def _first(v) -> int:
    return int(v[0] if isinstance(v, (tuple, list)) else v)
