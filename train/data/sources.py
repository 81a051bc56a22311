"""Where training text comes from: named sets of files, each split deterministically into train and validation.

A source is any object with `files() -> list[pathlib.Path]` (sorted, so the order never depends on the file
system). `split_by_file` assigns each file to train or validation by a hash of its name relative to the source
root, so the split is the same on every machine and does not change when files are added or removed elsewhere.
"""

import dataclasses
import glob as glob_module
import os
import pathlib
import sysconfig
import zlib


@dataclasses.dataclass(frozen=True)
class PythonStdlib:
    """The `.py` files of the running interpreter's standard library: ~15 MB of text every Python install has.

    Test suites (`test/`, `tests/`, `idle_test/`) and installed packages (`site-packages/`) are left out by
    default: the former are large and repetitive, the latter differ between machines.
    """

    exclude_tests: bool = True

    @property
    def root(self) -> pathlib.Path:
        return pathlib.Path(sysconfig.get_paths()["stdlib"])

    def files(self) -> list[pathlib.Path]:
        excluded = {"site-packages", "dist-packages", "__pycache__"}
        if self.exclude_tests:
            excluded |= {"test", "tests", "idle_test"}
        found = []
        # os.walk with pruning, not rglob: site-packages can hold far more files than the stdlib itself.
        for directory, subdirectories, names in os.walk(self.root):
            subdirectories[:] = [name for name in subdirectories if name not in excluded]
            found.extend(pathlib.Path(directory, name) for name in names if name.endswith(".py"))
        if not found:
            raise FileNotFoundError(f"no .py files found under the standard library at {self.root}")
        return sorted(found)


@dataclasses.dataclass(frozen=True)
class TextFiles:
    """Files matching a glob pattern, e.g. `TextFiles(glob="~/notes/**/*.md")` (`**` recurses, `~` expands)."""

    glob: str

    @property
    def root(self) -> pathlib.Path:
        # Names are hashed relative to the pattern's fixed prefix, so moving the whole tree keeps the split.
        prefix = pathlib.Path(self.glob).expanduser()
        while any(ch in prefix.name for ch in "*?[") or not prefix.name:
            if prefix == prefix.parent:
                break
            prefix = prefix.parent
        return prefix if prefix.is_dir() else prefix.parent

    def files(self) -> list[pathlib.Path]:
        pattern = str(pathlib.Path(self.glob).expanduser())
        found = sorted(pathlib.Path(p) for p in glob_module.glob(pattern, recursive=True) if pathlib.Path(p).is_file())
        if not found:
            raise FileNotFoundError(f"TextFiles(glob={self.glob!r}) matched no files")
        return found


def split_by_file(
    paths: list[pathlib.Path], root: pathlib.Path, validation_percent: float
) -> tuple[list[pathlib.Path], list[pathlib.Path]]:
    """Returns (train, validation): a file is in validation when crc32(relative name) % 10_000 < percent * 100.

    If that puts no file in validation (few files, small percentage), the file with the smallest hash is moved there,
    and likewise for train, so both sides are never empty when there are at least two files.
    """
    if not 0 < validation_percent < 100:
        raise ValueError(f"validation_percent must be in (0, 100), got {validation_percent!r}")
    if len(paths) < 2:
        raise ValueError(f"need at least 2 files to split into train and validation, got {len(paths)}")

    def bucket(path: pathlib.Path) -> int:
        name = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()
        return zlib.crc32(name.encode()) % 10_000

    ranked = sorted(paths, key=lambda p: (bucket(p), p.as_posix()))
    threshold = validation_percent * 100
    validation = [p for p in ranked if bucket(p) < threshold] or ranked[:1]
    train = [p for p in ranked if p not in set(validation)] or ranked[-1:]
    validation = [p for p in validation if p not in set(train)]
    return sorted(train), sorted(validation)


def text_source(glob: str | None = None) -> PythonStdlib | TextFiles:
    """`TextFiles(glob)` when a glob is given, else the `PythonStdlib()` default.

    This lets one gin binding switch the quickstart to the user's own text: `TEXT_GLOB = '~/notes/**/*.md'`.
    """
    return PythonStdlib() if glob is None else TextFiles(glob=glob)
