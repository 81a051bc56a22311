"""timm ViT <-> attnx ViT conversion (models/interop/timm_vit.py): logits parity with timm both ways, an exact
round trip, position-embedding resampling as timm's, and errors that name the offending keys or options."""

import dataclasses

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import jax  # noqa: E402

from models.interop.timm_vit import from_timm_vit, to_timm_vit  # noqa: E402
from models.vit import ViT, ViTConfig  # noqa: E402

NAME = "vit_tiny_patch16_224"
KWARGS = dict(pretrained=False, img_size=32, patch_size=8, num_classes=10, depth=2)


def _timm(**overrides):
    torch.manual_seed(0)
    model = timm.create_model(NAME, **(KWARGS | overrides)).eval()
    with torch.no_grad():  # timm zero-inits the head and cls token: randomise all so every weight matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _images(size, batch=2):
    return np.random.default_rng(0).standard_normal((batch, size, size, 3)).astype(np.float32)


def _timm_logits(model, images_nhwc):
    with torch.no_grad():
        return model(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


@jax.jit
def _forward(graphdef_state, images):
    graphdef, state = graphdef_state
    return nnx.merge(graphdef, state)(images)


def _attnx_logits(config, state, images):
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: ViT(config, rngs=nnx.Rngs(0))))
    return np.asarray(_forward((graphdef, state), images))


@pytest.fixture(scope="module")
def reference():
    return _timm()


def test_from_timm_matches_timm_logits(reference):
    config, state = from_timm_vit(reference.state_dict(), model_name=NAME)
    assert (config.width, config.depth, config.num_heads, config.patch_size, config.image_size) == (192, 2, 3, 8, 32)
    images = _images(32)
    np.testing.assert_allclose(_attnx_logits(config, state, images), _timm_logits(reference, images),
                               atol=1e-4, rtol=1e-4)


def test_to_timm_loads_strict_and_matches(tmp_path):
    config = ViTConfig(image_size=32, patch_size=8, channels=3, num_classes=10, width=192, depth=2, num_heads=3,
                       mlp_width=768)
    model = ViT(config, rngs=nnx.Rngs(1))
    state = nnx.state(model, nnx.Param)
    state = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), state)
    path = tmp_path / "vit.safetensors"
    exported = to_timm_vit(state, config, out=path)
    target = timm.create_model(NAME, **KWARGS).eval()
    target.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in exported.items()}, strict=True)
    images = _images(32)
    np.testing.assert_allclose(_timm_logits(target, images), _attnx_logits(config, state, images),
                               atol=1e-4, rtol=1e-4)
    # Round trip through the written file is exact.
    back_config, back = from_timm_vit(path, config)
    assert back_config == config
    for (key, a), (_, b) in zip(nnx.to_flat_state(state), nnx.to_flat_state(back)):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(key))


def test_resampled_position_embedding_matches_timm(reference):
    from timm.layers import resample_abs_pos_embed

    from models.interop.timm_vit import resample_position_grid

    pos = reference.state_dict()["pos_embed"]
    grid = pos[0, 1:].numpy().reshape(4, 4, -1)
    for new, antialias in (((6, 6), True), ((3, 5), True), ((6, 6), False), ((3, 7), False), ((2, 2), True)):
        expected = resample_abs_pos_embed(pos, new_size=list(new), old_size=[4, 4], num_prefix_tokens=1,
                                          antialias=antialias)
        got = resample_position_grid(grid, new, antialias=antialias).reshape(-1, grid.shape[-1])
        np.testing.assert_allclose(got, expected[0, 1:].numpy(), atol=1e-5, rtol=1e-5, err_msg=f"{new} {antialias}")
    # A whole model at 48 px: timm's own resampled weights vs from_timm_vit(image_size=48).
    state_dict = dict(reference.state_dict())
    state_dict["pos_embed"] = resample_abs_pos_embed(pos, new_size=[6, 6], num_prefix_tokens=1)
    bigger = timm.create_model(NAME, **(KWARGS | dict(img_size=48))).eval()
    bigger.load_state_dict(state_dict, strict=True)
    config, state = from_timm_vit(reference.state_dict(), image_size=48, num_heads=3)
    images = _images(48, batch=1)
    np.testing.assert_allclose(_attnx_logits(config, state, images), _timm_logits(bigger, images),
                               atol=1e-4, rtol=1e-4)


def test_errors_name_keys_and_options(reference):
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    with pytest.raises(ValueError, match="num_heads"):
        from_timm_vit(state)
    broken = dict(state)
    del broken["blocks.1.mlp.fc2.bias"]
    broken["blocks.0.attn.proj.bias"] = np.zeros(5, np.float32)
    broken["extra.weight"] = np.zeros(1, np.float32)
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.fc2\.bias.*extra\.weight.*blocks\.0\.attn\.proj\.bias"):
        from_timm_vit(broken, num_heads=3)
    for key in ("reg_token", "blocks.0.ls1.gamma", "blocks.0.attn.q_norm.weight", "fc_norm.weight"):
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            from_timm_vit(state | {key: np.zeros(192, np.float32)}, num_heads=3)
    without_cls = {k: v for k, v in state.items() if k != "cls_token"}
    with pytest.raises(ValueError, match="cls_token"):
        from_timm_vit(without_cls, num_heads=3)
    config = ViTConfig(image_size=32, patch_size=8, channels=3, num_classes=10, width=192, depth=2, num_heads=3,
                       mlp_width=768)
    with pytest.raises(ValueError, match="depth: config 3"):
        from_timm_vit(state, dataclasses.replace(config, depth=3))
    with pytest.raises(ValueError, match="pooling='mean'"):
        to_timm_vit({}, dataclasses.replace(config, pooling="mean"))
