"""Full-model forward tests of the tiny variant (fgtbt_jax/models).

Variables are drawn with numpy (`models.random_variables`);
initialisation itself is tested on a single block
(`test_init_is_deterministic_from_the_seed`).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from fgtbt_jax import models
from fgtbt_jax.models import abstract_variables, build_model, model_config, normalize_images
from fgtbt_jax.models import mit

SIZE = 64


@pytest.fixture(scope="module")
def images():
  pixels = np.random.RandomState(0).randint(0, 256, (2, SIZE, SIZE, 3), np.uint8)
  # A bright square gives the frequency branch real edges to see.
  pixels[:, 20:44, 20:44] = 255
  return normalize_images(pixels)


@pytest.fixture(scope="module")
def tiny():
  model = build_model(model_config("tiny"))
  variables = models.random_variables(abstract_variables(model, SIZE))
  return model, variables


def _forward(config, variables, images):
  model = build_model(config)
  return jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)


@pytest.fixture(scope="module")
def tiny_output(tiny, images):
  model, variables = tiny
  return jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)


def test_forward_shape_dtype_and_finiteness(tiny_output):
  assert tiny_output.shape == (2, SIZE // 2, SIZE // 2, 124)
  assert tiny_output.dtype == jnp.float32
  assert np.isfinite(np.asarray(tiny_output)).all()
  assert float(jnp.std(tiny_output)) > 1e-3


@pytest.mark.parametrize("extractor", ["srm", "wavelet"])
def test_other_frequency_extractors_run_and_change_the_output(tiny, images, tiny_output,
                                                              extractor):
  _, variables = tiny
  out = _forward(model_config("tiny", frequency_extractor=extractor), variables, images)
  assert out.shape == tiny_output.shape and np.isfinite(np.asarray(out)).all()
  assert float(jnp.max(jnp.abs(out - tiny_output))) > 1e-3


def test_fgsa_off_network_runs_on_the_non_fgsa_parameters(tiny, images, tiny_output):
  _, variables = tiny
  config = model_config("tiny", fgsa=False)
  abstract = abstract_variables(build_model(config), SIZE)
  keep = set(flatten_dict(nn.meta.unbox(abstract)))
  reduced = unflatten_dict({k: v for k, v in flatten_dict(variables).items() if k in keep})
  assert len(keep) < len(flatten_dict(variables))
  out = _forward(config, reduced, images)
  assert out.shape == tiny_output.shape
  assert float(jnp.max(jnp.abs(out - tiny_output))) > 1e-3


# bfloat16 keeps 8 significant bits; the RMS difference of the heatmaps stays
# within this share of the float32 output's spread (measured: 1.5 % for tiny at
# 64 px, 0.9 % for small at 128 px; docs/model.md).
BF16_RELATIVE_TOLERANCE = 0.05


def test_bfloat16_compute_stays_close_to_float32(tiny, images, tiny_output):
  _, variables = tiny
  out = _forward(model_config("tiny", dtype="bfloat16"), variables, images)
  assert out.dtype == jnp.float32
  error = float(jnp.sqrt(jnp.mean((out - tiny_output) ** 2)) / jnp.std(tiny_output))
  assert error < BF16_RELATIVE_TOLERANCE


@pytest.fixture(scope="module")
def train_outputs(tiny, images):
  """Training-mode outputs and batch-stat updates for dropout keys 0, 0, 1."""
  model, variables = tiny

  @jax.jit
  def train_forward(variables, images, key):
    return model.apply(variables, images, train=True, rngs={"dropout": key},
                       mutable=["batch_stats"])

  return [train_forward(variables, images, jax.random.key(k)) for k in (0, 0, 1)]


def test_train_mode_is_seeded_by_the_dropout_rng(tiny, images, tiny_output, train_outputs):
  model, variables = tiny
  (out, _), (again, _), (other, _) = train_outputs
  assert out.shape == tiny_output.shape
  np.testing.assert_array_equal(out, again)
  assert float(jnp.max(jnp.abs(out - other))) > 1e-4  # dropout / drop path differ
  with pytest.raises(Exception, match="dropout"):
    jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]),
                   variables, images)


def test_train_mode_updates_batch_stats_with_momentum_0_9(tiny, images, train_outputs):
  _, variables = tiny
  _, updates = train_outputs[0]
  old = flatten_dict(variables["batch_stats"])
  new = flatten_dict(updates["batch_stats"])
  assert old.keys() == new.keys()
  assert not np.allclose(old["decoder", "fuse_norm", "mean"], new["decoder", "fuse_norm", "mean"])
  # The first BN of the stage-1 conv stem sees the normalised images directly.
  path = ("encoder", "stage_0", "patch_embed", "norm_in", "mean")
  batch_mean = jnp.mean(images, axis=(0, 1, 2))
  np.testing.assert_allclose(new[path], 0.9 * old[path] + 0.1 * batch_mean, rtol=1e-5, atol=1e-6)


def test_init_is_deterministic_from_the_seed():
  block = mit.Block(dim=16, num_heads=2, sr_ratio=2, grid=(4, 4))
  x = jnp.ones((1, 16, 16))
  init = jax.jit(block.init, static_argnums=2)
  a = init(jax.random.key(7), x, False)
  b = init(jax.random.key(7), x, False)
  c = init(jax.random.key(8), x, False)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(u, v)
  kernels = lambda t: [np.asarray(v) for k, v in flatten_dict(nn.meta.unbox(t)).items()
                       if k[-1] == "kernel"]
  assert all(not np.array_equal(u, v) for u, v in zip(kernels(a), kernels(c)))
  params = nn.meta.unbox(a)["params"]
  # MiT initialisation: linear std 0.02 (truncated), conv He normal over fan-out.
  fc1 = np.asarray(params["mlp"]["fc1"]["kernel"])
  assert 0.015 < fc1.std() < 0.025 and np.abs(fc1).max() <= 2 * 0.02 / 0.8796 + 1e-6
  sr = np.asarray(params["attention"]["sr"]["kernel"])  # 2x2, 16 -> 16
  assert 0.7 * np.sqrt(2 / 64) < sr.std() < 1.3 * np.sqrt(2 / 64)
  assert np.all(np.asarray(params["norm1"]["scale"]) == 1.0)
