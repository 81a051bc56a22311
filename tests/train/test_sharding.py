"""Mesh construction and batch placement on the suite's 8 fake CPU devices."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

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


def test_a_fixed_mesh_smaller_than_the_machine_uses_the_first_devices():
    mesh = sharding.make_mesh(sharding.MeshConfig(data=3))
    assert mesh.devices.size == 3 and list(mesh.devices.flat) == jax.devices()[:3]


def test_explicit_devices_must_fill_the_mesh():
    with pytest.raises(ValueError, match="needs 4 devices, found 2"):
        sharding.make_mesh(sharding.MeshConfig(data=2, tensor=2), devices=jax.devices()[:2])


def test_minus_one_fills_whichever_axis_carries_it():
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=-1))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1, "sequence": 1}


def test_weight_specs_follow_the_axis_letters_of_their_names():
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=2, tensor=4))
    assert sharding.weight_spec("query_dnh", (64, 8, 16), mesh) == P("fsdp", "tensor", None)
    assert sharding.weight_spec("gate_up_d2f", (64, 2, 128), mesh) == P("fsdp", None, "tensor")
    assert sharding.weight_spec("fc2_dd", (64, 64), mesh) == P("fsdp", None)  # each mesh axis once
    assert sharding.weight_spec("key_dkh", (64, 2, 16), mesh) == P("fsdp", None, None)  # 2 heads, 4-way tensor
    assert sharding.weight_spec("query_dnh", (3, 64, 8, 16), mesh) == P(None, "fsdp", "tensor", None)  # stacked
    assert sharding.weight_spec("projection", (64, 64), mesh) == P()  # no letters: replicated
    assert sharding.weight_spec("scale_d", (3, 64), mesh) == P(None, "fsdp")  # a stack of 3 layers' scales
    assert sharding.weight_spec("scale_d", (64, 3), mesh) == P(None, None)  # 3 does not split 2 ways
