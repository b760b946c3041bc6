"""Logical axis names, mesh rules and sharded execution (fgtbt_jax/models)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fgtbt_jax import models
from fgtbt_jax.models import (
    LOGICAL_AXIS_NAMES, abstract_variables, build_model, logical_axis_rules, model_config,
    variable_shardings)


def _mesh(data, fsdp):
  devices = np.array(jax.devices()[:data * fsdp]).reshape(data, fsdp)
  return Mesh(devices, ("data", "fsdp"))


@pytest.fixture(scope="module")
def paper_abstract():
  return abstract_variables(build_model(model_config("paper")), 64)


@pytest.fixture(scope="module")
def tiny():
  model = build_model(model_config("tiny"))
  abstract = abstract_variables(model, 64)
  return model, abstract, models.random_variables(abstract)


def test_eight_simulated_devices():
  assert len(jax.devices()) == 8


def test_every_parameter_name_is_a_declared_logical_axis(paper_abstract):
  specs = flatten_dict(nn.get_partition_spec(paper_abstract)["params"])
  used = {name for spec in specs.values() for name in spec}
  assert used <= set(LOGICAL_AXIS_NAMES)
  assert {"embed", "mlp", "qkv", "fused", "prompt", "decoder", "heatmaps", "conv_in",
          "conv_height", "conv_width", "norm"} <= used
  fc1 = specs["encoder", "stage_2", "block_5", "mlp", "fc1", "kernel"]
  assert fc1 == P("embed", "mlp")


def test_rules_cover_every_name_and_reject_unknown_modes():
  for mode in ("data", "fsdp"):
    rules = dict(logical_axis_rules(mode))
    assert set(rules) == set(LOGICAL_AXIS_NAMES)
    assert rules["batch"] == ("data", "fsdp")
    assert rules["norm"] is None
  assert all(v is None for k, v in logical_axis_rules("data") if k != "batch")
  with pytest.raises(ValueError, match="unknown sharding mode 'tensor'"):
    logical_axis_rules("tensor")


def test_flax_logical_to_mesh_sharding_with_data_rules(paper_abstract):
  mesh = _mesh(8, 1)
  shardings = nn.logical_to_mesh_sharding(
      nn.get_partition_spec(paper_abstract), mesh, logical_axis_rules("data"))
  flat = flatten_dict(shardings["params"])
  assert all(isinstance(s, NamedSharding) for s in flat.values())
  assert all(all(a is None for a in s.spec) for s in flat.values())  # replicated


def test_fsdp_rules_shard_every_large_matrix(paper_abstract):
  mesh = _mesh(1, 8)
  shardings = variable_shardings(paper_abstract, mesh, logical_axis_rules("fsdp"))
  shapes = flatten_dict(nn.meta.unbox(paper_abstract)["params"])
  flat = flatten_dict(shardings["params"])
  large = [path for path, x in shapes.items() if x.size >= 2**16]
  assert len(large) > 150
  for path in large:
    assert "fsdp" in flat[path].spec, path
  assert flat["encoder", "stage_2", "block_5", "mlp", "fc1", "kernel"].spec == P("fsdp", None)
  assert flat["encoder", "stage_2", "block_5", "mlp", "fc2", "kernel"].spec == P(None, "fsdp")
  assert flat["decoder", "fuse", "kernel"].spec == P(None, None, None, "fsdp")
  # ... but not the depthwise kernels: split by channel, they made the TPU compiler
  # split the convolution by channel and gather the batch's maps (464 GB per chip
  # and step on a v5e 4 x 4 mesh, benchmarks/README.md).
  depthwise = [path for path in flat if "dwconv" in path]
  assert len(depthwise) > 50 and all(  # kernels and biases of every block
      all(a is None for a in flat[path].spec) for path in depthwise)
  # Sharded parameters take 1/8 of the memory per device.
  per_device = sum(
      np.prod(flat[p].shard_shape(x.shape)) for p, x in shapes.items())
  total = sum(x.size for x in shapes.values())
  assert per_device < 0.15 * total


def test_widths_that_do_not_divide_stay_replicated(tiny):
  _, abstract, _ = tiny
  flat = flatten_dict(variable_shardings(abstract, _mesh(1, 8), logical_axis_rules("fsdp"))["params"])
  # tiny stage 1: Refine maps 3 -> 4 channels; neither divides by 8.
  refine = flat["encoder", "stage_0", "fgsa", "refine", "conv_in", "kernel"]
  assert refine.spec == P(None, None, None, None)
  # ... while the 16-wide patch embedding shards its output channels.
  embed = flat["encoder", "stage_0", "patch_embed", "proj", "kernel"]
  assert embed.spec == P(None, None, None, "fsdp")
  stats = flatten_dict(variable_shardings(abstract, _mesh(1, 8), logical_axis_rules("fsdp"))[
      "batch_stats"])
  assert all(a is None for a in stats["decoder", "fuse_norm", "mean"].spec)


def test_sharded_init_equals_single_device_init():
  from fgtbt_jax.models import mit
  block = mit.Block(dim=16, num_heads=2, sr_ratio=2, grid=(4, 4))
  x = jnp.ones((8, 16, 16))
  init = lambda key: block.init(key, x, False)
  expected = jax.jit(init)(jax.random.key(3))
  mesh = _mesh(1, 8)
  abstract = jax.eval_shape(init, jax.random.key(3))
  shardings = variable_shardings(abstract, mesh, logical_axis_rules("fsdp"))
  with jax.set_mesh(mesh):
    sharded = jax.jit(lambda key: nn.meta.unbox(init(key)), out_shardings=shardings)(
        jax.random.key(3))
  fc1 = sharded["params"]["mlp"]["fc1"]["kernel"]
  assert fc1.sharding.spec == P("fsdp", None)
  for a, b in zip(jax.tree.leaves(nn.meta.unbox(expected)), jax.tree.leaves(sharded)):
    np.testing.assert_array_equal(a, b)


def _sharded_apply(model, rules, mesh, train):
  def apply(variables, images):
    with nn.logical_axis_rules(rules):
      if train:
        return model.apply(variables, images, train=True, rngs={"dropout": jax.random.key(0)},
                           mutable=["batch_stats"])
      return model.apply(variables, images, train=False)
  return apply


def test_fsdp_sharded_forward_equals_single_device(tiny):
  model, abstract, variables = tiny
  images = jax.random.normal(jax.random.key(0), (8, 64, 64, 3))
  expected = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  mesh = _mesh(2, 4)
  rules = logical_axis_rules("fsdp")
  shardings = variable_shardings(abstract, mesh, rules)
  batch = NamedSharding(mesh, P(("data", "fsdp")))
  with jax.set_mesh(mesh):
    placed = jax.device_put(variables, shardings)
    out = jax.jit(_sharded_apply(model, rules, mesh, train=False),
                  in_shardings=(shardings, batch))(placed, jax.device_put(images, batch))
  assert out.sharding.shard_shape(out.shape)[0] == 1  # batch split over all 8 devices
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_batch_norm_statistics_are_global_under_a_sharded_batch(tiny):
  model, abstract, variables = tiny
  images = jax.random.normal(jax.random.key(1), (8, 64, 64, 3)) * jnp.arange(1, 9)[:, None, None, None]
  apply = _sharded_apply(model, (), None, train=True)
  _, expected = jax.jit(apply)(variables, images)
  mesh = _mesh(8, 1)
  rules = logical_axis_rules("data")
  batch = NamedSharding(mesh, P(("data", "fsdp")))
  with jax.set_mesh(mesh):
    _, updates = jax.jit(_sharded_apply(model, rules, mesh, train=True))(
        variables, jax.device_put(images, batch))
  got = flatten_dict(updates["batch_stats"])
  want = flatten_dict(expected["batch_stats"])
  for path in want:
    np.testing.assert_allclose(got[path], want[path], rtol=1e-4, atol=1e-5, err_msg=str(path))
  # The images differ in scale, so one device's own statistics (one image) would
  # differ from the global ones the sharded step reproduced.
  assert not np.allclose(jnp.mean(images[:1], axis=(0, 1, 2)), jnp.mean(images, axis=(0, 1, 2)),
                         atol=1e-2)
