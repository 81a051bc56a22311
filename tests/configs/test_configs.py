"""Every gin file under configs/ parses and builds its model at a tiny size (ARCHITECTURE §7)."""

import pathlib
import re

import gin
import pytest
from flax import nnx

from train import gin_config

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs"
GIN_FILES = sorted(CONFIG_DIR.rglob("*.gin"))
# Overlays (ARCHITECTURE §5) are single-purpose and need a base; they are built on top of the quickstart.
OVERLAY_DIRS = ("attention", "sharding", "distributed")
# Model-size files only set macros; each family's are built on top of its experiment (skipped until it exists).
SIZE_FILE_BASES = {"models/vit": "experiments/vit_digits.gin", "models/dit": "experiments/dit_digits.gin",
                   "models/llm": "experiments/llm_stdlib.gin"}


def files_to_parse(gin_file: pathlib.Path) -> list[str]:
    relative = gin_file.relative_to(CONFIG_DIR)
    if relative.parts[0] in OVERLAY_DIRS:
        # A vision or diffusion overlay names its base in a header line "# Base: experiments/vit_digits.gin".
        declared = re.search(r"^#\s*Base:\s*(\S+)", gin_file.read_text(), flags=re.MULTILINE)
        base = CONFIG_DIR / (declared.group(1) if declared else "quickstart.gin")
        assert base.is_file(), f"{relative}: its Base: {base} does not exist"
        return [str(base), str(gin_file)]
    if relative.parent.as_posix() in SIZE_FILE_BASES:
        base = CONFIG_DIR / SIZE_FILE_BASES[relative.parent.as_posix()]
        if not base.exists():
            pytest.skip(f"{relative} is built on {base.relative_to(CONFIG_DIR)}, which does not exist yet")
        return [str(base), str(gin_file)]
    return [str(gin_file)]
# Macros that size models; a file that defines them is built with these values instead of its own (so large
# model-size files such as models/vit/L_16.gin build small here; tests/models checks their own values abstractly).
TINY_MACROS = {"WIDTH": 32, "DEPTH": 1, "NUM_HEADS": 2, "NUM_KV_HEADS": 1, "MLP_WIDTH": 64, "PATCH_SIZE": 2,
               "SEQ_LEN": 16, "BATCH_SIZE": 8}


def tiny_bindings(gin_file: pathlib.Path) -> list[str]:
    """TINY_MACROS for the macros the file defines, plus the file's own "# Tiny binding: <binding>" header lines, for
    files that bind a size directly (a MoH head plan fixes the head count, so it binds width and heads itself)."""
    text = gin_file.read_text()
    return [f"{name} = {value}" for name, value in TINY_MACROS.items()
            if re.search(rf"^{name}\s*=", text, flags=re.MULTILINE)] + \
        re.findall(r"^#\s*Tiny binding:\s*(.+?)\s*$", text, flags=re.MULTILINE)


def test_there_are_configs_to_check():
    assert CONFIG_DIR / "quickstart.gin" in GIN_FILES


# Files whose build repeats another file's code path at 10-12 s each on the CI machine: run with `-m slow`.
SLOW_FILES = {"models/dit/moh_S_2_75.gin", "models/dit/moh_B_2_75.gin", "experiments/dit_image_prompt.gin"}


@pytest.mark.parametrize("gin_file", [
    pytest.param(path, marks=pytest.mark.slow) if str(path.relative_to(CONFIG_DIR)) in SLOW_FILES else path
    for path in GIN_FILES], ids=lambda path: str(path.relative_to(CONFIG_DIR)))
def test_config_parses_and_builds_its_model(gin_file):
    base = [pathlib.Path(f) for f in files_to_parse(gin_file)]
    gin_config.parse([str(f) for f in base], [b for f in base for b in tiny_bindings(f)])
    try:
        task = gin.query_parameter("trainer.train.task").scoped_configurable_fn()
        model = task.build_model(nnx.Rngs(0))
        assert isinstance(model, nnx.Module)
        if gin_file.parent.name == "attention":  # the overlay's mechanism reached the model
            kinds = {m.kind for _, m in nnx.iter_graph(model) if hasattr(m, "kind")}
            if re.search(r"^#\s*Adds:", gin_file.read_text(), flags=re.MULTILINE):
                # an overlay that adds a layer beside the model's own attention (IP-Adapter's image-prompt cross
                # attention next to the DiT's softmax self attention) says so in an "# Adds:" header line
                assert gin_file.stem in kinds and kinds <= {gin_file.stem, "softmax"}, kinds
            else:
                assert kinds == {gin_file.stem}, kinds
        if gin_file.parent.name == "sharding":  # a sharding preset builds a mesh on the suite's 8 devices
            from train import sharding
            mesh = sharding.make_mesh(gin.query_parameter("trainer.train.mesh").scoped_configurable_fn())
            assert mesh.devices.size == 8, dict(mesh.shape)
        text = gin_file.read_text()
        for header in ("Provides:", "Required:", "Commonly overridden:"):
            assert header in text, f"{gin_file.name} lacks the {header!r} header line (ARCHITECTURE §5)"
    finally:
        gin.clear_config()
