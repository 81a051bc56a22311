"""Byte-level language-model data: files -> one byte stream -> fixed windows -> shuffled, sharded grain batches.

Each window holds `seq_len + 1` bytes; the model reads the first `seq_len` and predicts the last `seq_len`. Training
windows start every `seq_len` bytes, so consecutive windows share exactly one byte and every byte is a target once per
epoch. Files are joined with a NUL byte, which never occurs in text, so the model can learn where a file ends.
"""

import dataclasses
import functools
from typing import Any

import grain
import numpy as np

from train.data.sources import PythonStdlib, split_by_file

FILE_SEPARATOR = b"\x00"


class ByteWindows:
    """Random-access source of overlapping byte windows over one uint8 array (a grain `RandomAccessDataSource`)."""

    def __init__(self, data: np.ndarray, window: int, stride: int):
        if data.size < window:
            raise ValueError(f"{data.size} bytes of text is shorter than one window of {window} bytes")
        self.data, self.window, self.stride = data, window, stride

    def __len__(self) -> int:
        return (self.data.size - self.window) // self.stride + 1

    def __getitem__(self, index: int) -> np.ndarray:
        start = int(index) * self.stride
        return self.data[start : start + self.window]

    def __repr__(self) -> str:  # grain records the source's repr in its iterator state
        return f"ByteWindows(bytes={self.data.size}, window={self.window}, stride={self.stride})"


def _read_joined(paths) -> np.ndarray:
    return np.frombuffer(FILE_SEPARATOR.join(path.read_bytes() for path in paths), dtype=np.uint8)


@dataclasses.dataclass(frozen=True)
class ByteLMData:
    """Train/validation byte windows from a text `source` (`PythonStdlib()` or `TextFiles(glob=...)`).

    batch_size is global (summed over processes); validation_bytes caps the validation text that is evaluated, so an
    evaluation costs the same whatever the corpus; the compression baselines see exactly these bytes.
    """

    source: Any = dataclasses.field(default_factory=PythonStdlib)
    seq_len: int = 256
    batch_size: int = 16
    validation_percent: float = 2.0
    validation_bytes: int = 65_536
    seed: int = 0
    prefetch: int = 4

    def __post_init__(self):
        if not hasattr(self.source, "files"):
            raise ValueError(f"ByteLMData.source must be PythonStdlib() or TextFiles(glob=...), got {self.source!r}")
        for name in ("seq_len", "batch_size", "validation_bytes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"ByteLMData.{name} must be a positive int, got {getattr(self, name)!r}")

    @functools.cached_property
    def _split(self):
        return split_by_file(self.source.files(), self.source.root, self.validation_percent)

    @functools.cached_property
    def train_bytes(self) -> np.ndarray:
        return _read_joined(self._split[0])

    @functools.cached_property
    def validation_text(self) -> bytes:
        """The first `validation_bytes` bytes of the validation files, joined: what evaluation and baselines see."""
        return _read_joined(self._split[1])[: self.validation_bytes].tobytes()

    def train_iterator(self, process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
        """Endless iterator of {"tokens": uint8 [batch_size / process_count, seq_len + 1]} for this process.

        The window order is a seeded permutation, reshuffled every epoch; process p takes every process_count-th
        window of it, so processes see disjoint windows. `get_state()`/`set_state()` resume it exactly.
        """
        if self.batch_size % process_count:
            raise ValueError(f"batch_size={self.batch_size} is not divisible by process_count={process_count}")
        windows = ByteWindows(self.train_bytes, self.seq_len + 1, self.seq_len)
        # Repeat, then slice: the processes split one endless reshuffled stream, so at every step their shares are
        # exactly the windows one process would read (slicing first made each process's share an epoch of its
        # own, ending at a different step when the window count is not a multiple of process_count).
        dataset = grain.MapDataset.source(windows).shuffle(seed=self.seed).repeat()
        dataset = dataset[process_index::process_count]
        dataset = dataset.map(lambda window: {"tokens": window})
        dataset = dataset.batch(self.batch_size // process_count, drop_remainder=True)
        read_options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=self.prefetch)
        return iter(dataset.to_iter_dataset(read_options))

    def validation_windows(self) -> np.ndarray:
        """Validation text as windows [W, seq_len + 1] sharing one byte, so every byte but the first is a target.

        The tail that does not fill a window is padded with zeros; `validation_target_mask` marks the real targets.
        """
        data = np.frombuffer(self.validation_text, dtype=np.uint8)
        count = max(1, -(-(data.size - 1) // self.seq_len))
        padded = np.zeros(count * self.seq_len + 1, np.uint8)
        padded[: data.size] = data
        starts = np.arange(count) * self.seq_len
        return np.stack([padded[s : s + self.seq_len + 1] for s in starts])

    def validation_target_mask(self) -> np.ndarray:
        """[W, seq_len] float32: 1 where the target byte is real validation text, 0 on the padded tail."""
        count = self.validation_windows().shape[0]
        target_index = 1 + np.arange(count * self.seq_len).reshape(count, self.seq_len)
        return (target_index < len(self.validation_text)).astype(np.float32)
