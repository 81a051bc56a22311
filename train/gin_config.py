"""Gin parsing for the CLI, t5x style: gin files import our modules with `dynamic_registration` and bind plain
classes and functions, so library code carries no gin decorators.

What this adds to gin: search paths (the repository root, so `include 'configs/...'` works from anywhere), one
error type with the offending binding in its message, a check that command-line macros are actually used (gin
accepts `WDITH = 64` silently), and writing the resolved config to the workdir.
"""

import pathlib
import re

import gin

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
RESOLVED_CONFIG_FILE = "config.gin"


class GinConfigError(ValueError):
    """A gin file or binding could not be applied; the message says which and why."""


def parse(gin_files: list[str], gin_bindings: list[str]) -> None:
    """Parses `gin_files` in order, then `gin_bindings` (later ones win). Raises GinConfigError on any problem."""
    gin.clear_config()
    for search_path in (pathlib.Path.cwd(), REPO_ROOT):
        gin.add_config_file_search_path(str(search_path))
    for gin_file in gin_files:
        if not _find_config_file(gin_file):
            raise GinConfigError(f"gin file {gin_file!r} not found (looked in {pathlib.Path.cwd()} and {REPO_ROOT})")
    try:
        gin.parse_config_files_and_bindings(gin_files, gin_bindings, finalize_config=False)
    except Exception as error:  # gin raises ValueError/TypeError/ImportError... with the location appended
        raise GinConfigError(f"invalid gin configuration: {error}") from error
    _check_macros_are_used(gin_bindings)
    gin.finalize()


def configured(function):
    """The gin-configured version of `function`; it must be bound in the gin files (e.g. `trainer.train.steps`)."""
    try:
        return gin.get_configurable(function)
    except ValueError as error:
        name = f"{function.__module__}.{function.__qualname__}"
        raise GinConfigError(
            f"the gin files bind nothing for {name}; import its module and configure it, as configs/quickstart.gin "
            "does") from error


def write_resolved_config(workdir: str | pathlib.Path) -> pathlib.Path:
    """Writes every binding in force (files and command line, macros resolved in place) to `<workdir>/config.gin`."""
    path = pathlib.Path(workdir) / RESOLVED_CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(gin.config_str())
    return path


def _find_config_file(gin_file: str) -> bool:
    candidates = [pathlib.Path(gin_file)] + [root / gin_file for root in (pathlib.Path.cwd(), REPO_ROOT)]
    return any(candidate.is_file() for candidate in candidates)


_MACRO_BINDING = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=")


def _check_macros_are_used(gin_bindings: list[str]) -> None:
    """A command-line macro (`NAME = value`) that no binding references is almost surely a typo."""
    config = gin.config_str()
    for binding in gin_bindings:
        for line in binding.splitlines():
            match = _MACRO_BINDING.match(line)
            if match and not re.search(rf"%{match.group(1)}\b", config):
                raise GinConfigError(
                    f"binding {line.strip()!r} sets macro {match.group(1)} but no configuration uses "
                    f"%{match.group(1)}; check the spelling")
