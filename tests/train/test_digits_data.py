"""The digits pipeline: the stratified split the spec's baselines were measured on, batches, shifts, resumption."""

import numpy as np
import pytest

from train.data.digits import DigitsData, random_shift


def test_split_is_stratified_fixed_and_disjoint():
    data = DigitsData()
    train_x, train_y = data.arrays("train")
    test_x, test_y = data.arrays("test")
    assert train_x.shape == (1347, 8, 8, 1) and test_x.shape == (450, 8, 8, 1)
    assert train_x.dtype == np.float32 and 0 <= train_x.min() and train_x.max() <= 1
    # Stratified: every class holds a quarter of its images (to within rounding) in the test split.
    counts_test, counts_all = np.bincount(test_y, minlength=10), np.bincount(np.r_[train_y, test_y], minlength=10)
    assert np.all(np.abs(counts_test - counts_all * 0.25) <= 1)
    flat = {row.tobytes() for row in train_x.reshape(len(train_x), -1)}
    assert sum(row.tobytes() in flat for row in test_x.reshape(len(test_x), -1)) <= 5  # the set has a few duplicates
    np.testing.assert_array_equal(DigitsData(seed=7).arrays("test")[1], test_y)  # the shuffle seed keeps the split


def test_batches_cover_an_epoch_and_resume_exactly():
    data = DigitsData(batch_size=50, max_shift=1)
    iterator = data.train_iterator()
    labels = np.concatenate([next(iterator)["label"] for _ in range(26)])  # 1,300 of the 1,347 images
    assert np.bincount(labels, minlength=10).min() > 100
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(3)]
    resumed = data.train_iterator()
    resumed.set_state(state)
    for batch in expected:
        again = next(resumed)
        np.testing.assert_array_equal(again["image"], batch["image"])
        np.testing.assert_array_equal(again["label"], batch["label"])


def test_processes_get_disjoint_halves():
    first = next(DigitsData(batch_size=8).train_iterator(0, 2))
    second = next(DigitsData(batch_size=8).train_iterator(1, 2))
    assert first["image"].shape == (4, 8, 8, 1)
    assert not np.array_equal(first["image"], second["image"])


def test_random_shift_moves_ink_by_at_most_the_limit():
    images = np.zeros((200, 8, 8, 1), np.float32)
    images[:, 3, 4] = 1.0
    shifted = random_shift(images, np.random.default_rng(0), 1)
    positions = {tuple(np.argwhere(image[..., 0])[0]) for image in shifted}
    assert positions == {(3 + dy, 4 + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
    assert np.all(shifted.sum(axis=(1, 2, 3)) == 1)  # one pixel of ink each: a roll, not a blur
    corner = np.zeros((300, 8, 8, 1), np.float32)
    corner[:, 0, 7] = 1.0  # a roll wraps: the corner pixel lands in the opposite row / column
    landed = {tuple(np.argwhere(image[..., 0])[0]) for image in random_shift(corner, np.random.default_rng(1), 1)}
    assert (7, 0) in landed and (1, 6) in landed and len(landed) == 9


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), "batch_size must be a positive int"),
    (dict(test_fraction=1.5), "test_fraction must be in"),
    (dict(max_shift=5), "max_shift must be an int in"),
])
def test_bad_values_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DigitsData(**kwargs)
