"""DiT weights to and from diffusers' `DiTTransformer2DModel` and the original DiT code (Peebles & Xie, 2023,
"Scalable Diffusion Models with Transformers", arXiv 2212.09748, §3.2; facebookresearch/DiT `models.py`).

Both layouts hold the same network as `models.dit.DiT`; the converters only rename, transpose and reshape:
- PyTorch Linear weights are [out, in]; ours are [in, ...out axes] (axis letters, ARCHITECTURE §3).
- The patch conv [D, C, p, p] flattens in (row, column, channel) order, our `patchify` order; the output linear's
  p * p * C_out features are in the same order in both libraries' unpatchify (`nhwpqc`).
- adaLN chunks: (shift, scale, gate) for attention then for the MLP in all three; the final layer's two chunks are
  (shift, scale) in DiT, diffusers' `proj_out_1` and ours alike.
- diffusers gives every block its own timestep and label embedders (`norm1.emb`) though the forward pass reads only
  block 0's for the final layer and each block's own for its modulation; attnx shares one, so `from_diffusers_dit`
  requires them equal and `to_diffusers_dit` copies ours into every block.
- diffusers' timestep sinusoids use `downscale_freq_shift=1` (frequencies 10000^(-i / (half - 1))), DiT's
  10000^(-i / half); both put cosines first. We represent diffusers' spacing by
  `DiTConfig.timestep_max_period = 10000^(half / (half - 1))`.
- diffusers' LayerNorm before the MLP (`norm3`) uses `norm_eps` (1e-5 by default), ours and DiT's 1e-6: a
  difference of eps / variance in the normalised activations (below 1e-5 relative for unit-scale tokens).
- The label table has num_classes + 1 rows (the null class of classifier-free guidance, last); DiT drops that row
  when class_dropout_prob is 0, which we refuse (attnx always keeps it).
"""
import json
import math
import os
from typing import Any, Mapping

import numpy as np
from flax import nnx

from models.dit import DiT, DiTConfig
from models.interop._common import check_keys, flat_params, param_shapes, state_from_flat, to_numpy
from models.layers.patch import sincos_2d

FREQUENCY_DIM = 256  # both libraries embed t with 256 sinusoids before the MLP
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def diffusers_max_period(frequency_dim: int = FREQUENCY_DIM) -> float:
    """The max_period that reproduces diffusers' downscale_freq_shift=1 with DiT's frequency formula."""
    half = frequency_dim // 2
    return 10_000.0 ** (half / (half - 1))


def _state(config: DiTConfig, flat: dict[str, np.ndarray]) -> nnx.State:
    return state_from_flat(lambda: DiT(config, rngs=nnx.Rngs(0)), flat, np.float32)



def _parts_of(params_or_model, config: DiTConfig, where: str) -> dict[tuple, np.ndarray]:
    """The DiT's parameters (checked against `config`'s tree) as torch-layout parts, for both export layouts."""
    flat = flat_params(params_or_model)
    check_keys(where, flat, param_shapes(lambda: DiT(config, rngs=nnx.Rngs(0))))
    return _to_torch_parts(config, flat)


def _check_representable(config: DiTConfig, where: str) -> None:
    plain = DiTConfig(input_size=config.input_size, patch_size=config.patch_size, in_channels=config.in_channels,
                      num_classes=config.num_classes, width=config.width, depth=config.depth,
                      num_heads=config.num_heads, mlp_ratio=config.mlp_ratio, learn_sigma=config.learn_sigma,
                      class_dropout_prob=config.class_dropout_prob, param_dtype=config.param_dtype,
                      timestep_max_period=config.timestep_max_period)
    extra = [f for f in ("attention", "attention_kwargs", "layer_attention", "image_prompt_tokens",
                         "dense_prompt_dim", "layer_num_heads", "attention_head_dim", "cross_attention")
             if getattr(config, f) != getattr(plain, f)]
    if extra:
        raise ValueError(f"{where}: the config uses {extra}, which the plain DiT layout cannot hold; only softmax "
                         f"attention without image prompts, head plans or cross-attention converts")


# ---------------------------------------------------------------- the common core: a DiT-like flat dictionary
# Both layouts are first brought to "parts": a dict keyed by our parameter paths, holding PyTorch-oriented arrays.

def _from_torch_parts(config: DiTConfig, get) -> dict[str, np.ndarray]:
    """Our flat params from a getter of PyTorch-layout arrays by role: get(role, block=None)."""
    d, n, h, p, c = config.width, config.num_heads, config.head_dim, config.patch_size, config.in_channels
    out = {
        "patch_embed.kernel_pd": get("patch.w").transpose(2, 3, 1, 0).reshape(p * p * c, d),
        "patch_embed.bias_d": get("patch.b"),
        "timestep_embedder.fc1_fd": get("t1.w").T, "timestep_embedder.fc1_bias_d": get("t1.b"),
        "timestep_embedder.fc2_dd": get("t2.w").T, "timestep_embedder.fc2_bias_d": get("t2.b"),
        "label_embedder.embedding_vd": get("label"),
        "final_layer.modulation.modulation_dcd": get("final_mod.w").T.reshape(d, 2, d),
        "final_layer.modulation.modulation_bias_cd": get("final_mod.b").reshape(2, d),
        "final_layer.linear_dp": get("final.w").T, "final_layer.linear_bias_p": get("final.b"),
    }
    for i in range(config.depth):
        b = f"blocks.{i}."
        q, k, v = get("q.w", i), get("k.w", i), get("v.w", i)
        out.update({
            b + "attention.query_dnh": q.T.reshape(d, n, h), b + "attention.query_bias_nh": get("q.b", i).reshape(n, h),
            b + "attention.key_dkh": k.T.reshape(d, n, h), b + "attention.key_bias_kh": get("k.b", i).reshape(n, h),
            b + "attention.value_dkh": v.T.reshape(d, n, h), b + "attention.value_bias_kh": get("v.b", i).reshape(n, h),
            b + "attention.out_nhd": get("o.w", i).T.reshape(n, h, d), b + "attention.out_bias_d": get("o.b", i),
            b + "mlp.fc1_df": get("fc1.w", i).T, b + "mlp.fc1_bias_f": get("fc1.b", i),
            b + "mlp.fc2_fd": get("fc2.w", i).T, b + "mlp.fc2_bias_d": get("fc2.b", i),
            b + "modulation.modulation_dcd": get("mod.w", i).T.reshape(d, 6, d),
            b + "modulation.modulation_bias_cd": get("mod.b", i).reshape(6, d),
        })
    return out


def _to_torch_parts(config: DiTConfig, flat: Mapping[str, np.ndarray]) -> dict[tuple, np.ndarray]:
    """PyTorch-layout arrays by (role, block) from our flat params (the inverse of `_from_torch_parts`)."""
    d, p, c = config.width, config.patch_size, config.in_channels
    out = {
        ("patch.w", None): flat["patch_embed.kernel_pd"].reshape(p, p, c, d).transpose(3, 2, 0, 1),
        ("patch.b", None): flat["patch_embed.bias_d"],
        ("t1.w", None): flat["timestep_embedder.fc1_fd"].T, ("t1.b", None): flat["timestep_embedder.fc1_bias_d"],
        ("t2.w", None): flat["timestep_embedder.fc2_dd"].T, ("t2.b", None): flat["timestep_embedder.fc2_bias_d"],
        ("label", None): flat["label_embedder.embedding_vd"],
        ("final_mod.w", None): flat["final_layer.modulation.modulation_dcd"].reshape(d, 2 * d).T,
        ("final_mod.b", None): flat["final_layer.modulation.modulation_bias_cd"].reshape(-1),
        ("final.w", None): flat["final_layer.linear_dp"].T, ("final.b", None): flat["final_layer.linear_bias_p"],
    }
    for i in range(config.depth):
        b = f"blocks.{i}."
        for role, name in (("q", "query_dnh"), ("k", "key_dkh"), ("v", "value_dkh")):
            out[(role + ".w", i)] = flat[b + "attention." + name].reshape(d, -1).T
        out[("q.b", i)] = flat[b + "attention.query_bias_nh"].reshape(-1)
        out[("k.b", i)] = flat[b + "attention.key_bias_kh"].reshape(-1)
        out[("v.b", i)] = flat[b + "attention.value_bias_kh"].reshape(-1)
        out[("o.w", i)] = flat[b + "attention.out_nhd"].reshape(-1, d).T
        out[("o.b", i)] = flat[b + "attention.out_bias_d"]
        out[("fc1.w", i)], out[("fc1.b", i)] = flat[b + "mlp.fc1_df"].T, flat[b + "mlp.fc1_bias_f"]
        out[("fc2.w", i)], out[("fc2.b", i)] = flat[b + "mlp.fc2_fd"].T, flat[b + "mlp.fc2_bias_d"]
        out[("mod.w", i)] = flat[b + "modulation.modulation_dcd"].reshape(d, 6 * d).T
        out[("mod.b", i)] = flat[b + "modulation.modulation_bias_cd"].reshape(-1)
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


# ---------------------------------------------------------------- diffusers

_DIFFUSERS_GLOBAL = {"patch.w": "pos_embed.proj.weight", "patch.b": "pos_embed.proj.bias",
                     "final_mod.w": "proj_out_1.weight", "final_mod.b": "proj_out_1.bias",
                     "final.w": "proj_out_2.weight", "final.b": "proj_out_2.bias"}
_DIFFUSERS_EMBED = {"t1.w": "norm1.emb.timestep_embedder.linear_1.weight",
                    "t1.b": "norm1.emb.timestep_embedder.linear_1.bias",
                    "t2.w": "norm1.emb.timestep_embedder.linear_2.weight",
                    "t2.b": "norm1.emb.timestep_embedder.linear_2.bias",
                    "label": "norm1.emb.class_embedder.embedding_table.weight"}
_DIFFUSERS_BLOCK = {"q.w": "attn1.to_q.weight", "q.b": "attn1.to_q.bias", "k.w": "attn1.to_k.weight",
                    "k.b": "attn1.to_k.bias", "v.w": "attn1.to_v.weight", "v.b": "attn1.to_v.bias",
                    "o.w": "attn1.to_out.0.weight", "o.b": "attn1.to_out.0.bias",
                    "fc1.w": "ff.net.0.proj.weight", "fc1.b": "ff.net.0.proj.bias",
                    "fc2.w": "ff.net.2.weight", "fc2.b": "ff.net.2.bias",
                    "mod.w": "norm1.linear.weight", "mod.b": "norm1.linear.bias"}


def _diffusers_name(role: str, block: int | None, embed_block: int = 0) -> str:
    if role in _DIFFUSERS_GLOBAL:
        return _DIFFUSERS_GLOBAL[role]
    if role in _DIFFUSERS_EMBED:
        return f"transformer_blocks.{embed_block}.{_DIFFUSERS_EMBED[role]}"
    return f"transformer_blocks.{block}.{_DIFFUSERS_BLOCK[role]}"


def _expected_diffusers(config: DiTConfig) -> dict[str, tuple[int, ...]]:
    d, p = config.width, config.patch_size
    f, v = config.mlp_width, config.num_classes + 1
    shapes = {"patch.w": (d, config.in_channels, p, p), "patch.b": (d,), "final_mod.w": (2 * d, d),
              "final_mod.b": (2 * d,), "final.w": (p * p * config.out_channels, d),
              "final.b": (p * p * config.out_channels,)}
    embed = {"t1.w": (d, FREQUENCY_DIM), "t1.b": (d,), "t2.w": (d, d), "t2.b": (d,), "label": (v, d)}
    block = {"q.w": (d, d), "q.b": (d,), "k.w": (d, d), "k.b": (d,), "v.w": (d, d), "v.b": (d,), "o.w": (d, d),
             "o.b": (d,), "fc1.w": (f, d), "fc1.b": (f,), "fc2.w": (d, f), "fc2.b": (d,), "mod.w": (6 * d, d),
             "mod.b": (6 * d,)}
    out = {_diffusers_name(r, None): s for r, s in shapes.items()}
    for i in range(config.depth):
        out.update({_diffusers_name(r, None, i): s for r, s in embed.items()})
        out.update({_diffusers_name(r, i): s for r, s in block.items()})
    return out


def config_from_diffusers(hf: Mapping[str, Any], class_dropout_prob: float = 0.1) -> DiTConfig:
    """The DiTConfig of a `DiTTransformer2DModel` config.json dict; refuses what attnx's DiT cannot represent."""
    wrong = {k: hf.get(k, default) for k, default, allowed in (
        ("norm_type", "ada_norm_zero", "ada_norm_zero"), ("activation_fn", "gelu-approximate", "gelu-approximate"),
        ("attention_bias", True, True), ("upcast_attention", False, False),
        ("norm_elementwise_affine", False, False)) if hf.get(k, default) != allowed}
    if wrong:
        raise ValueError(f"config_from_diffusers: unsupported DiTTransformer2DModel settings {wrong}; attnx's DiT "
                         f"is norm_type='ada_norm_zero', activation_fn='gelu-approximate', attention_bias=True, "
                         f"upcast_attention=False, norm_elementwise_affine=False")
    if hf.get("num_embeds_ada_norm") is None:
        raise ValueError("config_from_diffusers: num_embeds_ada_norm is None; attnx's DiT is class-conditional")
    heads, head_dim = int(hf["num_attention_heads"]), int(hf["attention_head_dim"])
    in_channels = int(hf["in_channels"])
    out_channels = hf.get("out_channels") or in_channels
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"config_from_diffusers: out_channels={out_channels} must be in_channels={in_channels} "
                         f"or 2 * in_channels (learn_sigma)")
    return DiTConfig(input_size=int(hf["sample_size"]), patch_size=int(hf["patch_size"]), in_channels=in_channels,
                     num_classes=int(hf["num_embeds_ada_norm"]), width=heads * head_dim,
                     depth=int(hf["num_layers"]), num_heads=heads, mlp_ratio=4.0,
                     learn_sigma=out_channels == 2 * in_channels, class_dropout_prob=class_dropout_prob,
                     timestep_max_period=diffusers_max_period())


def config_to_diffusers(config: DiTConfig) -> dict[str, Any]:
    """The config.json dict of the `DiTTransformer2DModel` that holds `config`'s DiT."""
    _check_representable(config, "config_to_diffusers")
    if not math.isclose(config.timestep_max_period, diffusers_max_period(), rel_tol=1e-12):
        raise ValueError(f"config_to_diffusers: timestep_max_period={config.timestep_max_period} but diffusers "
                         f"spaces timestep frequencies as max_period={diffusers_max_period()} (downscale_freq_shift"
                         f"=1); convert original-DiT weights with to_dit_original instead")
    if config.mlp_ratio != 4.0:
        raise ValueError(f"config_to_diffusers: mlp_ratio={config.mlp_ratio}; diffusers' DiT MLP is 4x the width")
    return {"_class_name": "DiTTransformer2DModel", "num_attention_heads": config.num_heads,
            "attention_head_dim": config.head_dim, "in_channels": config.in_channels,
            "out_channels": config.out_channels, "num_layers": config.depth, "sample_size": config.input_size,
            "patch_size": config.patch_size, "num_embeds_ada_norm": config.num_classes,
            "activation_fn": "gelu-approximate", "norm_type": "ada_norm_zero", "attention_bias": True,
            "upcast_attention": False, "norm_elementwise_affine": False, "dropout": 0.0}


def _read_source(source) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(state dict, config.json dict or None) from a directory, a .safetensors file or an in-memory dict."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        hf = None
        if os.path.isdir(path):
            with open(os.path.join(path, "config.json")) as f:
                hf = json.load(f)
            path = os.path.join(path, DIFFUSERS_WEIGHTS)
        if not path.endswith(".safetensors"):
            raise ValueError(f"from_diffusers_dit: source={source!r} must be a directory or a .safetensors file")
        from safetensors.numpy import load_file
        return load_file(path), hf
    return dict(source), None


def from_diffusers_dit(source, config: DiTConfig | None = None) -> tuple[DiTConfig, nnx.State]:
    """(DiTConfig, params) from a diffusers `DiTTransformer2DModel`: a directory (config.json +
    diffusion_pytorch_model.safetensors), a .safetensors file or a state dict (numpy arrays or torch tensors).
    `config` is required without a config.json; it must then carry timestep_max_period=diffusers_max_period()."""
    state, hf = _read_source(source)
    if config is None:
        if hf is None:
            raise ValueError("from_diffusers_dit: config is None and the source has no config.json; pass "
                             "config=config_from_diffusers(model.config)")
        config = config_from_diffusers(hf)
    config_to_diffusers(config)  # refuses what the diffusers layout cannot hold
    check_keys("from_diffusers_dit", state, _expected_diffusers(config))
    state = {k: to_numpy(v).astype(np.float32) for k, v in state.items()}
    for role in _DIFFUSERS_EMBED:  # every block carries a copy of the embedders; attnx shares one
        first = state[_diffusers_name(role, None, 0)]
        differing = [_diffusers_name(role, None, i) for i in range(1, config.depth)
                     if not np.array_equal(state[_diffusers_name(role, None, i)], first)]
        if differing:
            raise ValueError(f"from_diffusers_dit: {differing} differ from block 0's copy; attnx's DiT shares one "
                             f"timestep and label embedder across blocks")
    flat = _from_torch_parts(config, lambda role, block=None: state[_diffusers_name(role, block)])
    return config, _state(config, flat)


def to_diffusers_dit(params_or_model, config: DiTConfig, out: str | os.PathLike | None = None
                     ) -> dict[str, np.ndarray]:
    """The `DiTTransformer2DModel` state dict of a DiT (module, nnx.State or flat dict); with `out`, also writes
    out/config.json and out/diffusion_pytorch_model.safetensors (loadable by `from_pretrained`)."""
    hf = config_to_diffusers(config)
    parts = _parts_of(params_or_model, config, "to_diffusers_dit")
    result = {}
    for (role, block), value in parts.items():
        if role in _DIFFUSERS_EMBED:
            for i in range(config.depth):
                result[_diffusers_name(role, None, i)] = value.copy()
        else:
            result[_diffusers_name(role, block)] = value
    if out is not None:
        from safetensors.numpy import save_file
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        save_file(result, os.path.join(out, DIFFUSERS_WEIGHTS))
    return result


# ---------------------------------------------------------------- facebookresearch/DiT models.py

def _original_names(config: DiTConfig) -> dict[str, tuple[int, ...]]:
    d, p, f = config.width, config.patch_size, config.mlp_width
    out = {"x_embedder.proj.weight": (d, config.in_channels, p, p), "x_embedder.proj.bias": (d,),
           "t_embedder.mlp.0.weight": (d, FREQUENCY_DIM), "t_embedder.mlp.0.bias": (d,),
           "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
           "y_embedder.embedding_table.weight": (config.num_classes + 1, d),
           "final_layer.adaLN_modulation.1.weight": (2 * d, d), "final_layer.adaLN_modulation.1.bias": (2 * d,),
           "final_layer.linear.weight": (p * p * config.out_channels, d),
           "final_layer.linear.bias": (p * p * config.out_channels,)}
    for i in range(config.depth):
        b = f"blocks.{i}."
        out.update({b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
                    b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,), b + "mlp.fc1.weight": (f, d),
                    b + "mlp.fc1.bias": (f,), b + "mlp.fc2.weight": (d, f), b + "mlp.fc2.bias": (d,),
                    b + "adaLN_modulation.1.weight": (6 * d, d), b + "adaLN_modulation.1.bias": (6 * d,)})
    return out


_ORIGINAL_GLOBAL = {"patch.w": "x_embedder.proj.weight", "patch.b": "x_embedder.proj.bias",
                    "t1.w": "t_embedder.mlp.0.weight", "t1.b": "t_embedder.mlp.0.bias",
                    "t2.w": "t_embedder.mlp.2.weight", "t2.b": "t_embedder.mlp.2.bias",
                    "label": "y_embedder.embedding_table.weight",
                    "final_mod.w": "final_layer.adaLN_modulation.1.weight",
                    "final_mod.b": "final_layer.adaLN_modulation.1.bias",
                    "final.w": "final_layer.linear.weight", "final.b": "final_layer.linear.bias"}
_ORIGINAL_BLOCK = {"o.w": "attn.proj.weight", "o.b": "attn.proj.bias", "fc1.w": "mlp.fc1.weight",
                   "fc1.b": "mlp.fc1.bias", "fc2.w": "mlp.fc2.weight", "fc2.b": "mlp.fc2.bias",
                   "mod.w": "adaLN_modulation.1.weight", "mod.b": "adaLN_modulation.1.bias"}
_QKV = {"q": 0, "k": 1, "v": 2}


def _check_original_config(config: DiTConfig, where: str) -> None:
    _check_representable(config, where)
    if config.timestep_max_period != 10_000.0:
        raise ValueError(f"{where}: timestep_max_period={config.timestep_max_period}; the original DiT uses 10000")


def from_dit_original(state_dict: Mapping[str, Any], config: DiTConfig) -> tuple[DiTConfig, nnx.State]:
    """(config, params) from a facebookresearch/DiT state dict (e.g. torch.load of DiT-XL-2-256x256.pt). The fixed
    `pos_embed` buffer, if present, must equal the sin-cos table attnx computes."""
    _check_original_config(config, "from_dit_original")
    state = {k: to_numpy(v).astype(np.float32) for k, v in dict(state_dict).items()}
    check_keys("from_dit_original", state, _original_names(config), ignore=("pos_embed",))
    if "pos_embed" in state:
        ours = sincos_2d(config.width, (config.grid_size, config.grid_size))
        theirs = state["pos_embed"].reshape(-1, config.width) if state["pos_embed"].size == ours.size else None
        if theirs is None or not np.allclose(theirs, ours, atol=1e-6):
            raise ValueError(f"from_dit_original: pos_embed {state['pos_embed'].shape} is not the fixed 2-D sin-cos "
                             f"table [1, {config.num_patches}, {config.width}] that attnx computes")

    def get(role, block=None):
        if role in _ORIGINAL_GLOBAL:
            return state[_ORIGINAL_GLOBAL[role]]
        if role[0] in _QKV:  # the fused qkv Linear(D, 3D): rows q, then k, then v
            fused = state[f"blocks.{block}.attn.qkv.{'weight' if role.endswith('w') else 'bias'}"]
            return np.split(fused, 3, axis=0)[_QKV[role[0]]]
        return state[f"blocks.{block}.{_ORIGINAL_BLOCK[role]}"]

    return config, _state(config, _from_torch_parts(config, get))


def to_dit_original(params_or_model, config: DiTConfig, out: str | os.PathLike | None = None,
                    include_pos_embed: bool = True) -> dict[str, np.ndarray]:
    """The facebookresearch/DiT state dict (numpy) of a DiT, with its `pos_embed` buffer [1, T, D] unless
    include_pos_embed=False; with `out`, also writes it as a .safetensors file."""
    _check_original_config(config, "to_dit_original")
    parts = _parts_of(params_or_model, config, "to_dit_original")
    result = {}
    for (role, block), value in parts.items():
        if role in _ORIGINAL_GLOBAL:
            result[_ORIGINAL_GLOBAL[role]] = value
        elif role in _ORIGINAL_BLOCK:
            result[f"blocks.{block}.{_ORIGINAL_BLOCK[role]}"] = value
    for i in range(config.depth):
        for kind in ("w", "b"):
            result[f"blocks.{i}.attn.qkv.{'weight' if kind == 'w' else 'bias'}"] = np.concatenate(
                [parts[(f"{r}.{kind}", i)] for r in "qkv"], axis=0)
    if include_pos_embed:
        result["pos_embed"] = sincos_2d(config.width, (config.grid_size, config.grid_size))[None]
    if out is not None:
        from safetensors.numpy import save_file
        save_file(result, os.fspath(out))
    return result

