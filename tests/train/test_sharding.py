"""Mesh construction and batch placement on the suite's 8 fake CPU devices."""

import jax
import numpy as np
import pytest

from train import sharding


def test_mesh_uses_every_device_on_the_data_axis():
    mesh = sharding.make_mesh()
    assert mesh.axis_names == sharding.MESH_AXES
    assert mesh.shape["data"] == len(jax.devices()) == 8


def test_batch_is_split_along_its_first_axis():
    mesh = sharding.make_mesh()
    batch = {"tokens": np.arange(8 * 5, dtype=np.uint8).reshape(8, 5)}
    placed = sharding.put_batch(mesh, batch)["tokens"]
    assert placed.shape == (8, 5)
    assert {shard.data.shape for shard in placed.addressable_shards} == {(1, 5)}
    np.testing.assert_array_equal(np.asarray(placed), batch["tokens"])


def test_unimplemented_axes_and_bad_sizes_are_errors():
    with pytest.raises(NotImplementedError, match="tensor"):
        sharding.MeshConfig(tensor=2)
    with pytest.raises(ValueError, match="needs 3 devices"):
        sharding.make_mesh(sharding.MeshConfig(data=3))
