"""Data pipeline: deterministic file split, seeded shuffling, per-process sharding, exact iterator resume."""

import dataclasses

import numpy as np
import pytest

from train.data.byte_lm import ByteLMData, ByteWindows
from train.data.sources import PythonStdlib, TextFiles, split_by_file


def take(iterator, count):
    return [next(iterator)["tokens"].copy() for _ in range(count)]


@pytest.fixture()
def data(corpus):
    return ByteLMData(source=TextFiles(glob=str(corpus / "*.py")), seq_len=16, batch_size=4, validation_percent=20.0)


def test_split_is_deterministic_disjoint_and_complete(corpus):
    files = TextFiles(glob=str(corpus / "*.py")).files()
    train, validation = split_by_file(files, corpus, 20.0)
    assert (train, validation) == split_by_file(list(reversed(files)), corpus, 20.0)
    assert set(train).isdisjoint(validation) and sorted(train + validation) == sorted(files)
    assert train and validation


def test_split_does_not_depend_on_other_files(tmp_path, write_corpus):
    """A file's side is decided by its own name, so adding files never moves existing ones."""
    small = write_corpus(tmp_path / "a", files=30)
    train, validation = split_by_file(TextFiles(str(small / "*.py")).files(), small, 20.0)
    write_corpus(tmp_path / "a", files=60)
    train_more, validation_more = split_by_file(TextFiles(str(small / "*.py")).files(), small, 20.0)
    assert set(validation) <= set(validation_more) and set(train) <= set(train_more)


def test_python_stdlib_source_finds_library_modules_without_tests():
    files = PythonStdlib().files()
    names = {path.relative_to(PythonStdlib().root).as_posix() for path in files}
    assert "os.py" in names and "json/decoder.py" in names
    assert not any(name.startswith(("test/", "site-packages/")) for name in names)


def test_text_files_reports_an_empty_glob(tmp_path):
    with pytest.raises(FileNotFoundError, match="matched no files"):
        TextFiles(glob=str(tmp_path / "*.nothing")).files()


def test_shuffle_is_deterministic_by_seed(data):
    first = take(data.train_iterator(), 5)
    again = take(data.train_iterator(), 5)
    other_seed = take(dataclasses.replace(data, seed=1).train_iterator(), 5)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other_seed))


def test_processes_read_disjoint_windows(tmp_path):
    # Random letters, so that equal bytes mean the same window (the shared corpus repeats its lines).
    rng = np.random.default_rng(0)
    for index in range(6):
        (tmp_path / f"f{index}.txt").write_bytes(rng.integers(97, 123, 2000, dtype=np.uint8).tobytes())
    data = ByteLMData(source=TextFiles(glob=str(tmp_path / "*.txt")), seq_len=16, batch_size=4,
                      validation_percent=20.0)
    windows = ByteWindows(data.train_bytes, data.seq_len + 1, data.seq_len)
    seen = []
    for process in range(2):
        batches = take(data.train_iterator(process_index=process, process_count=2), 3)
        assert batches[0].shape == (data.batch_size // 2, data.seq_len + 1)
        seen.append({bytes(row) for batch in batches for row in batch})
    assert seen[0].isdisjoint(seen[1])
    assert all(any(np.array_equal(windows[i], np.frombuffer(row, np.uint8)) for i in range(len(windows)))
               for row in list(seen[0])[:5])


def test_iterator_state_resumes_exactly(data):
    iterator = data.train_iterator()
    take(iterator, 3)
    state = iterator.get_state()
    expected = take(iterator, 4)
    resumed = data.train_iterator()
    resumed.set_state(state)
    assert all(np.array_equal(a, b) for a, b in zip(expected, take(resumed, 4)))


def test_validation_windows_predict_every_byte_once(data):
    text = data.validation_text
    windows, mask = data.validation_windows(), data.validation_target_mask()
    targets = windows[:, 1:][mask > 0]
    assert bytes(targets) == text[1:]
    assert np.array_equal(windows[1:, 0], windows[:-1, -1])  # consecutive windows share one byte


def test_bad_values_are_reported():
    with pytest.raises(ValueError, match="seq_len"):
        ByteLMData(seq_len=0)
    with pytest.raises(ValueError, match="validation_percent"):
        split_by_file([], None, 150.0)
