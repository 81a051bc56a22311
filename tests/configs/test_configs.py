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
OVERLAY_DIRS = ("attention",)


def files_to_parse(gin_file: pathlib.Path) -> list[str]:
    if gin_file.relative_to(CONFIG_DIR).parts[0] in OVERLAY_DIRS:
        return [str(CONFIG_DIR / "quickstart.gin"), str(gin_file)]
    return [str(gin_file)]
# Macros that size models; a file that defines them is built with these values instead of its own.
TINY_MACROS = {"WIDTH": 32, "DEPTH": 1, "NUM_HEADS": 2, "NUM_KV_HEADS": 1, "SEQ_LEN": 16, "BATCH_SIZE": 8}


def tiny_bindings(gin_file: pathlib.Path) -> list[str]:
    text = gin_file.read_text()
    return [f"{name} = {value}" for name, value in TINY_MACROS.items()
            if re.search(rf"^{name}\s*=", text, flags=re.MULTILINE)]


def test_there_are_configs_to_check():
    assert CONFIG_DIR / "quickstart.gin" in GIN_FILES


@pytest.mark.parametrize("gin_file", GIN_FILES, ids=lambda path: str(path.relative_to(CONFIG_DIR)))
def test_config_parses_and_builds_its_model(gin_file):
    base = [pathlib.Path(f) for f in files_to_parse(gin_file)]
    gin_config.parse([str(f) for f in base], [b for f in base for b in tiny_bindings(f)])
    try:
        task = gin.query_parameter("trainer.train.task").scoped_configurable_fn()
        model = task.build_model(nnx.Rngs(0))
        assert isinstance(model, nnx.Module)
        if gin_file.parent.name == "attention":  # the overlay's mechanism reached the model
            kinds = {m.kind for _, m in nnx.iter_graph(model) if hasattr(m, "kind")}
            assert kinds == {gin_file.stem}, kinds
        text = gin_file.read_text()
        for header in ("Provides:", "Required:", "Commonly overridden:"):
            assert header in text, f"{gin_file.name} lacks the {header!r} header line (ARCHITECTURE §5)"
    finally:
        gin.clear_config()
