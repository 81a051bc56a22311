"""timm VisionTransformer checkpoints to and from the attnx ViT (issue 9).

`from_timm_vit(source)` reads a timm ViT state dict (in memory, torch tensors or numpy arrays, or a .safetensors /
.pth / .bin file) and returns (ViTConfig, nnx.State); `to_timm_vit(params, config)` goes back to timm names. The
architecture is that of Dosovitskiy et al. 2021 (arXiv 2010.11929, §3.1, Eq. 1-4) as timm builds it by default:
pre-norm blocks, LayerNorm eps 1e-6, exact GELU, a class token read out after the final norm, and one learned
position vector per token, the class token's included. `models/vit.py` builds exactly that with its default
options, so the conversion is a renaming plus reshapes:

- timm fuses query, key and value in `attn.qkv.weight` [3D, D] (rows q, k, v, each head-major [N, H]); attnx keeps
  `query_dnh` / `key_dkh` / `value_dkh` [D, N, H].
- The patch convolution [D, C, p, p] becomes our [p * p * C, D] kernel in (row, column, channel) order
  (models/layers/patch.py).
- torch Linear weights are [out, in]; ours are [in, out].

Variants the attnx ViT cannot represent (no class token, register tokens, layer scale, qk-norm, a pre-norm before
the blocks, fc_norm / average pooling, attention pooling) are refused by the key that reveals them.

`image_size=` resamples the patch-grid part of the position embedding as timm's `resample_abs_pos_embed`
(bicubic, align_corners=False; antialias True by default as in timm, which makes torch use its antialiased kernel
with a = -0.5, or False: the plain kernel with a = -0.75), written in numpy as interpolation matrices, so a
fine-tune at another resolution starts from the same numbers as in timm.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Mapping

import numpy as np
from flax import nnx

from models.interop._common import check_keys, flat_params, param_shapes, state_from_flat, to_numpy
from models.vit import ViT, ViTConfig

# Heads of timm's named ViT sizes (the width alone does not determine them).
_HEADS_BY_SIZE = {"tiny": 3, "small": 6, "base": 12, "large": 16, "huge": 16}

# Keys of timm options the attnx ViT has no counterpart for, and what they mean.
_UNSUPPORTED = {
    "reg_token": "register tokens (reg_tokens > 0)",
    "ls1.gamma": "layer scale (init_values)",
    "ls2.gamma": "layer scale (init_values)",
    "attn.q_norm.weight": "qk-norm (qk_norm=True)",
    "attn.k_norm.weight": "qk-norm (qk_norm=True)",
    "norm_pre.weight": "a norm before the blocks (pre_norm=True)",
    "fc_norm.weight": "fc_norm / average pooling (global_pool='avg')",
    "attn_pool.latent": "attention pooling (global_pool='map')",
    "attn.norm.weight": "a norm inside attention (scale_attn_norm=True)",
    "mlp.norm.weight": "a norm inside the MLP (scale_mlp_norm=True)",
}


def _read(source: Any) -> dict[str, np.ndarray]:
    if isinstance(source, Mapping):
        return {k: to_numpy(v) for k, v in source.items()}
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"source must be a state dict or a .safetensors/.pth/.bin path, got {type(source).__name__}")
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise ValueError(f"source={path!r} is not a file")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return dict(load_file(path))
    if path.endswith((".pth", ".pt", ".bin")):
        import torch  # only for the pickle formats

        state = torch.load(path, map_location="cpu", weights_only=True)
        for wrapper in ("state_dict", "model"):  # training checkpoints nest the weights
            if isinstance(state, Mapping) and wrapper in state and isinstance(state[wrapper], Mapping):
                state = state[wrapper]
        return {k: to_numpy(v) for k, v in state.items()}
    raise ValueError(f"source={path!r}: expected a .safetensors, .pth, .pt or .bin file")


def _refuse_unsupported(state: Mapping[str, Any]) -> None:
    found = sorted({f"{k} ({why})" for k in state for suffix, why in _UNSUPPORTED.items()
                    if k == suffix or k.endswith("." + suffix)})
    if found:
        raise ValueError(f"timm ViT uses options the attnx ViT cannot represent: {found}")
    if "cls_token" not in state:
        raise ValueError("timm ViT has no cls_token (class_token=False); the attnx ViT with pooling='cls' needs one "
                         "and its 'mean' pooling has no timm fc_norm equivalent here")
    if "pos_embed" not in state:
        raise ValueError("timm ViT has no pos_embed (pos_embed='none'); the attnx ViT here needs learned positions")


def _heads_from_name(model_name: str) -> int:
    match = re.match(r"(?:deit_|vit_)(tiny|small|base|large|huge)_", model_name)
    if not match:
        raise ValueError(f"model_name={model_name!r}: cannot read the head count (expected vit_<tiny|small|base|"
                         f"large|huge>_..., e.g. vit_tiny_patch16_224); pass num_heads=")
    return _HEADS_BY_SIZE[match.group(1)]


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter a, at offsets x (zero beyond |x| >= 2)."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _bicubic_matrix(in_size: int, out_size: int, antialias: bool) -> np.ndarray:
    """[out, in] matrix of torch's bicubic resize by size with align_corners=False.

    antialias=False: upsample_bicubic2d (a = -0.75, 4 taps, source index not clamped, border taps clamped).
    antialias=True (timm's default): the separable antialiased path (a = -0.5, PIL's), whose support widens by the
    downscale factor and whose weights are normalised over the taps inside the image.
    """
    scale = in_size / out_size
    matrix = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    if not antialias:
        source = (rows + 0.5) * scale - 0.5
        floor = np.floor(source)
        for tap in range(4):
            index = np.clip(floor.astype(np.int64) - 1 + tap, 0, in_size - 1)
            np.add.at(matrix, (rows, index), _cubic(source - floor + 1 - tap, -0.75))
        return matrix
    support = 2.0 * max(scale, 1.0)
    inverse = 1.0 / scale if scale > 1.0 else 1.0
    for i in rows:
        center = (i + 0.5) * scale
        start = max(int(center - support + 0.5), 0)
        stop = min(int(center + support + 0.5), in_size)
        taps = np.arange(start, stop)
        weights = _cubic((taps - center + 0.5) * inverse, -0.5)
        matrix[i, taps] = weights / weights.sum()
    return matrix


def resample_position_grid(grid_embedding: np.ndarray, new_grid: tuple[int, int], *,
                           antialias: bool = True) -> np.ndarray:
    """[h, w, D] position vectors of the patch grid -> [h', w', D], as timm.layers.resample_abs_pos_embed
    (bicubic, align_corners=False; antialias=True is timm's default and what its checkpoint filter uses)."""
    h, w, _ = grid_embedding.shape
    if (h, w) == tuple(new_grid):
        return grid_embedding
    rows = _bicubic_matrix(h, new_grid[0], antialias)
    columns = _bicubic_matrix(w, new_grid[1], antialias)
    return np.einsum("ih,hwd,jw->ijd", rows, grid_embedding.astype(np.float64), columns)


def _expected_timm_shapes(config: ViTConfig, grid: tuple[int, int]) -> dict[str, tuple[int, ...]]:
    d, f, p, c = config.width, config.mlp_width, config.patch_size, config.channels
    shapes = {"cls_token": (1, 1, d), "pos_embed": (1, 1 + grid[0] * grid[1], d),
              "patch_embed.proj.weight": (d, c, p, p), "patch_embed.proj.bias": (d,),
              "norm.weight": (d,), "norm.bias": (d,), "head.weight": (config.num_classes, d),
              "head.bias": (config.num_classes,)}
    for i in range(config.depth):
        b = f"blocks.{i}."
        shapes |= {b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "attn.qkv.weight": (3 * d, d),
                   b + "attn.qkv.bias": (3 * d,), b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                   b + "norm2.weight": (d,), b + "norm2.bias": (d,), b + "mlp.fc1.weight": (f, d),
                   b + "mlp.fc1.bias": (f,), b + "mlp.fc2.weight": (d, f), b + "mlp.fc2.bias": (d,)}
    return shapes


def _check_representable(config: ViTConfig) -> None:
    """The attnx ViT options timm's default VisionTransformer shares; anything else has no timm counterpart here."""
    wanted = {"pooling": "cls", "position": "learned", "attention": "softmax", "layer_attention": (),
              "embed": "patch", "mlp": "gelu", "use_attention": True, "qk_norm": False, "qkv_bias": True,
              "stages": (), "stage_norm": False}
    wrong = [f"{k}={getattr(config, k)!r} (timm ViT: {v!r})" for k, v in wanted.items() if getattr(config, k) != v]
    if dict(config.attention_kwargs):
        wrong.append(f"attention_kwargs={dict(config.attention_kwargs)!r} (timm ViT: {{}})")
    if wrong:
        raise ValueError(f"ViTConfig options without a timm VisionTransformer counterpart: {wrong}")


def _grid(config: ViTConfig) -> tuple[int, int]:
    size = config.image_size if isinstance(config.image_size, tuple) else (config.image_size,) * 2
    return size[0] // config.patch_size, size[1] // config.patch_size


def from_timm_vit(source: Mapping[str, Any] | str | os.PathLike, config: ViTConfig | None = None, *,
                  image_size: int | tuple[int, int] | None = None, num_heads: int | None = None,
                  model_name: str | None = None, antialias: bool = True) -> tuple[ViTConfig, nnx.State]:
    """A timm ViT state dict -> (ViTConfig, nnx.State of the attnx ViT's parameters, float32).

    Width, depth, MLP width, patch size, channels, class count and the trained (square) grid come from the shapes;
    the head count from `num_heads`, `config.num_heads` or `model_name` (e.g. "vit_tiny_patch16_224" -> 3).
    A given `config` is checked against the checkpoint. `image_size` (default: config.image_size, else the trained
    size) other than the trained size resamples the position grid bicubically, as timm does (`antialias` as
    timm's, default True). Use as
    `model = nnx.merge(nnx.graphdef(ViT(config, rngs=nnx.Rngs(0))), state)`; images are NHWC (timm takes NCHW).
    """
    state = _read(source)
    _refuse_unsupported(state)
    conv = state.get("patch_embed.proj.weight")
    if conv is None or conv.ndim != 4 or conv.shape[2] != conv.shape[3]:
        raise ValueError(f"patch_embed.proj.weight must be a square conv kernel [D, C, p, p], got "
                         f"{None if conv is None else conv.shape}")
    width, channels, patch = conv.shape[0], conv.shape[1], conv.shape[2]
    patches = state["pos_embed"].shape[1] - 1
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"pos_embed has {patches} patch positions, not a square grid; pass config= with the "
                         f"trained image_size")
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    heads = [h for h in (num_heads, config.num_heads if config is not None else None,
                         _heads_from_name(model_name) if model_name is not None else None) if h is not None]
    if not heads:
        raise ValueError("num_heads cannot be read from the shapes: pass num_heads=, config= or model_name=")
    if len(set(heads)) > 1:
        raise ValueError(f"num_heads={num_heads}, config.num_heads and model_name={model_name!r} disagree: {heads}")
    if "head.weight" not in state:
        raise ValueError("the state dict has no head.weight (num_classes=0); the attnx ViT needs a classifier")
    trained = ViTConfig(image_size=side * patch, patch_size=patch, channels=channels,
                        num_classes=state["head.weight"].shape[0], width=width, depth=depth, num_heads=heads[0],
                        mlp_width=state["blocks.0.mlp.fc1.weight"].shape[0] if depth else 4 * width)
    check_keys("timm state dict", state, _expected_timm_shapes(trained, (side, side)))
    if image_size is None:
        image_size = config.image_size if config is not None else trained.image_size
    inferred = dataclasses.replace(trained, image_size=image_size)
    if config is not None:
        _check_representable(config)
        fields = ("patch_size", "channels", "num_classes", "width", "depth", "num_heads", "mlp_width", "image_size")
        wrong = [f"{k}: config {getattr(config, k)!r}, checkpoint {getattr(inferred, k)!r}" for k in fields
                 if getattr(config, k) != getattr(inferred, k)]
        if config.norm_eps != 1e-6:
            wrong.append(f"norm_eps: config {config.norm_eps}, timm ViT 1e-6")
        if wrong:
            raise ValueError(f"config does not match the timm checkpoint: {wrong}")
        inferred = config
    config = inferred
    d, n = width, config.num_heads
    h = d // n

    def w(name):
        return state[name].astype(np.float64)

    position = w("pos_embed")[0]
    grid = position[1:].reshape(side, side, d)
    position = np.concatenate([position[:1], resample_position_grid(grid, _grid(config), antialias=antialias).reshape(-1, d)])
    flat: dict[str, np.ndarray] = {
        "cls_token_d": w("cls_token").reshape(d),
        "position_td": position,
        # [D, C, p, p] -> [p, p, C, D] -> [p * p * C, D]: the (row, column, channel) order of patchify.
        "patch_embed.kernel_pd": w("patch_embed.proj.weight").transpose(2, 3, 1, 0).reshape(-1, d),
        "patch_embed.bias_d": w("patch_embed.proj.bias"),
        "final_norm.scale_d": w("norm.weight"), "final_norm.bias_d": w("norm.bias"),
        "head_dc": w("head.weight").T, "head_bias_c": w("head.bias"),
    }
    for i in range(config.depth):
        p, b = f"blocks.{i}.", f"stages.0.blocks.{i}."
        qkv = w(p + "attn.qkv.weight").reshape(3, n, h, d)  # rows: (q|k|v, head, head dim)
        qkv_bias = w(p + "attn.qkv.bias").reshape(3, n, h)
        for j, (kernel, bias) in enumerate((("query_dnh", "query_bias_nh"), ("key_dkh", "key_bias_kh"),
                                            ("value_dkh", "value_bias_kh"))):
            flat[f"{b}attention.{kernel}"] = qkv[j].transpose(2, 0, 1)
            flat[f"{b}attention.{bias}"] = qkv_bias[j]
        flat[b + "attention.out_nhd"] = w(p + "attn.proj.weight").T.reshape(n, h, d)
        flat[b + "attention.out_bias_d"] = w(p + "attn.proj.bias")
        for ours, theirs in (("attention_norm", "norm1"), ("mlp_norm", "norm2")):
            flat[f"{b}{ours}.scale_d"] = w(p + theirs + ".weight")
            flat[f"{b}{ours}.bias_d"] = w(p + theirs + ".bias")
        flat[b + "mlp.fc1_df"] = w(p + "mlp.fc1.weight").T
        flat[b + "mlp.fc1_bias_f"] = w(p + "mlp.fc1.bias")
        flat[b + "mlp.fc2_fd"] = w(p + "mlp.fc2.weight").T
        flat[b + "mlp.fc2_bias_d"] = w(p + "mlp.fc2.bias")
    # Placed in the ViT's own parameter tree, so a naming drift in models/vit.py fails here.
    return config, state_from_flat(lambda: ViT(config, rngs=nnx.Rngs(0)), flat, np.dtype(config.param_dtype))


def to_timm_vit(params_or_model: nnx.Module | nnx.State, config: ViTConfig,
                out: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """attnx ViT parameters (the model or its nnx.State of Params) -> timm VisionTransformer state dict (numpy).

    Load with `timm.create_model(name, pretrained=False, img_size=..., patch_size=..., num_classes=..., depth=...)`
    and `model.load_state_dict({k: torch.from_numpy(v) ...}, strict=True)`. With `out` (a .safetensors path), also
    writes the file, which timm reads with `pretrained_cfg_overlay=dict(file=out)`.
    """
    _check_representable(config)
    flat = flat_params(params_or_model)
    check_keys("attnx parameters", flat, param_shapes(lambda: ViT(config, rngs=nnx.Rngs(0))))
    d, n, p, c = config.width, config.num_heads, config.patch_size, config.channels
    out_state = {
        "cls_token": flat["cls_token_d"].reshape(1, 1, d),
        "pos_embed": flat["position_td"][None],
        "patch_embed.proj.weight": flat["patch_embed.kernel_pd"].reshape(p, p, c, d).transpose(3, 2, 0, 1),
        "patch_embed.proj.bias": flat["patch_embed.bias_d"],
        "norm.weight": flat["final_norm.scale_d"], "norm.bias": flat["final_norm.bias_d"],
        "head.weight": flat["head_dc"].T, "head.bias": flat["head_bias_c"],
    }
    for i in range(config.depth):
        b, t = f"stages.0.blocks.{i}.", f"blocks.{i}."
        a = b + "attention."
        out_state[t + "attn.qkv.weight"] = np.concatenate(
            [flat[a + k].transpose(1, 2, 0).reshape(d, d) for k in ("query_dnh", "key_dkh", "value_dkh")])
        out_state[t + "attn.qkv.bias"] = np.concatenate(
            [flat[a + k].reshape(d) for k in ("query_bias_nh", "key_bias_kh", "value_bias_kh")])
        out_state[t + "attn.proj.weight"] = flat[a + "out_nhd"].reshape(n * (d // n), d).T
        out_state[t + "attn.proj.bias"] = flat[a + "out_bias_d"]
        for ours, theirs in (("attention_norm", "norm1"), ("mlp_norm", "norm2")):
            out_state[t + theirs + ".weight"] = flat[b + ours + ".scale_d"]
            out_state[t + theirs + ".bias"] = flat[b + ours + ".bias_d"]
        out_state[t + "mlp.fc1.weight"] = flat[b + "mlp.fc1_df"].T
        out_state[t + "mlp.fc1.bias"] = flat[b + "mlp.fc1_bias_f"]
        out_state[t + "mlp.fc2.weight"] = flat[b + "mlp.fc2_fd"].T
        out_state[t + "mlp.fc2.bias"] = flat[b + "mlp.fc2_bias_d"]
    out_state = {k: np.ascontiguousarray(v) for k, v in out_state.items()}
    if out is not None:
        from safetensors.numpy import save_file

        save_file(out_state, os.fspath(out))
    return out_state
