"""The FGSA of the authors' released code (`model.fgsa_compat="authors"`) and the
PyTorch BatchNorm running variance (`model.batch_norm_unbiased_variance`).

Each behaviour is checked against a numpy computation of its definition
(AUTHORS_CODE section 2): the raw row-major reinterpretation of the token
buffer, channel attention with MLP biases pooled over batch and space, the
concat order [x, F_s, F_pa]; and the unbiased running-variance update.
Parameter counts come from `jax.eval_shape`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from scipy import special

from fgtbt_jax import models
from fgtbt_jax.models import abstract_variables, build_model, model_config, parameter_count
from fgtbt_jax.models import fgsa as fgsa_lib
from fgtbt_jax.models import layers


def _numpy_params(module, *inputs, seed=0, **kwargs):
  """Random numpy variables of `module` (no compiled init), as plain arrays."""
  abstract = jax.eval_shape(lambda *x: module.init(jax.random.key(0), *x, **kwargs), *inputs)
  return models.random_variables(abstract, seed)


def _dense(params, x):
  return x @ np.asarray(params["kernel"]) + (np.asarray(params["bias"]) if "bias" in params else 0)


@pytest.mark.parametrize("compat, expected", [("paper", 53_626_764), ("authors", 53_628_396)])
def test_parameter_counts_of_the_paper_network(compat, expected):
  # The authors' model without conv_seg has 53,628,396: the paper network plus
  # the 1,632 channel-attention biases.
  variables = abstract_variables(build_model(model_config("paper", fgsa_compat=compat)), 64)
  assert parameter_count(variables["params"]) == expected


def test_fgsa_compat_is_validated_by_name():
  assert model_config("tiny").fgsa_compat == "paper"
  with pytest.raises(ValueError, match="fgsa_compat='torch'"):
    model_config("tiny", fgsa_compat="torch")


def test_raw_reinterpretation_is_the_row_major_buffer_read_as_channels_first():
  b, a, d = 2, 3, 5
  tokens = np.random.default_rng(0).normal(size=(b, a * a, d)).astype(np.float32)
  # The authors' tensor.reshape(B, D, A, A) of the (B, N, D) buffer, as a NCHW map.
  nchw = tokens.reshape(b, d, a, a)
  expected = nchw.transpose(0, 2, 3, 1).reshape(b, a * a, d)  # (position, channel)
  got = np.asarray(fgsa_lib.raw_channels_first(jnp.asarray(tokens)))
  np.testing.assert_array_equal(got, expected)
  assert not np.array_equal(got, tokens)
  # Channel c of the map is the flat run c * N ... (c + 1) * N of a sample's buffer.
  np.testing.assert_array_equal(got[1, :, 3], tokens[1].reshape(-1)[3 * a * a:4 * a * a])
  np.testing.assert_array_equal(np.asarray(fgsa_lib.raw_tokens(jnp.asarray(got))), tokens)


def _channel_attention_numpy(x, params, pool_batch):
  axes = (0, 1) if pool_batch else (1,)
  mlp = lambda d: _dense(params["excite"], np.maximum(_dense(params["squeeze"], d), 0))
  logits = mlp(x.mean(axis=axes)) + mlp(x.max(axis=axes))
  scale = 1 / (1 + np.exp(-logits))
  return x * (scale if pool_batch else scale[:, None, :])


@pytest.mark.parametrize("authors", [False, True])
def test_channel_attention_against_numpy(authors):
  x = np.random.default_rng(1).normal(size=(3, 16, 32)).astype(np.float32)
  module = fgsa_lib.ChannelAttention(16, use_bias=authors, pool_batch=authors)
  variables = _numpy_params(module, jnp.asarray(x))
  params = variables["params"]
  assert ("bias" in params["squeeze"]) == ("bias" in params["excite"]) == authors
  got = np.asarray(module.apply(variables, jnp.asarray(x)))
  np.testing.assert_allclose(got, _channel_attention_numpy(x, params, authors),
                             rtol=1e-5, atol=1e-6)
  # Pooling over the batch makes a sample's output depend on its batch-mates.
  changed = x.copy()
  changed[2] *= 3.0
  moved = np.asarray(module.apply(variables, jnp.asarray(changed)))
  assert np.array_equal(moved[0], got[0]) != authors


def _gelu(x):
  return 0.5 * x * (1 + special.erf(x / np.sqrt(2)))


def _stage(compat, dim=32, depth=2):
  return fgsa_lib.FGSAStage(dim, depth, patch_size=3, stride=2, compat=compat)


def _stage_variables(stage, b=2, grid=4, seed=0):
  dim = stage.dim
  tokens = jnp.zeros((b, grid * grid, dim))
  structure = jnp.zeros((b, 2 * grid, 2 * grid, 3))

  def init(module, tokens, structure):
    prompt, _ = module.prompt(tokens, structure, train=False)
    return [module.inject(tokens, prompt, j, train=False) for j in range(module.depth)]

  abstract = jax.eval_shape(
      lambda t, s: nn.init(init, stage)(jax.random.key(0), t, s), tokens, structure)
  return models.random_variables(abstract, seed)


def test_authors_inject_against_numpy():
  stage = _stage("authors")
  variables = _stage_variables(stage)
  rng = np.random.default_rng(2)
  b, n, c = 2, 16, 32
  x = rng.normal(size=(b, n, c)).astype(np.float32)
  prompt = rng.normal(size=(b, n, c // 2)).astype(np.float32)
  got = nn.apply(lambda m, x, p: m.inject(x, p, 1, train=False), stage)(
      variables, jnp.asarray(x), jnp.asarray(prompt))

  params, stats = variables["params"], variables["batch_stats"]["norm"]
  f = np.concatenate([x, prompt], axis=-1)  # prompt = [F_s, F_pa]: f = [x, F_s, F_pa]
  m = f.reshape(b, 3 * c // 2, n).transpose(0, 2, 1)  # raw (B, 1.5C, A, A), channels last
  g = _channel_attention_numpy(m, params["channel_attention"], pool_batch=True)
  g = ((g - np.asarray(stats["mean"])) / np.sqrt(np.asarray(stats["var"]) + 1e-5)
       * np.asarray(params["norm"]["scale"]) + np.asarray(params["norm"]["bias"]))
  g = _dense(params["conv"], np.maximum(g, 0))
  f = f + g.transpose(0, 2, 1).reshape(b, n, 3 * c // 2)  # read back raw
  expected = x + _dense(params["expand"], _gelu(_dense(params["reduce_1"], f)))
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4)


def test_prompt_order_is_structure_first_in_authors_mode():
  # The same variables for both (the prompt does not reach the channel attention).
  variables = _stage_variables(_stage("authors"), seed=3)
  tokens = np.random.default_rng(4).normal(size=(2, 16, 32)).astype(np.float32)
  structure = np.random.default_rng(5).normal(size=(2, 8, 8, 3)).astype(np.float32)
  image = _dense(variables["params"]["image_proj"], tokens)  # F_pa = Linear(C, C / 4)
  paper, authors = (
      np.asarray(nn.apply(lambda m, t, s: m.prompt(t, s, train=False)[0], _stage(compat))(
          variables, jnp.asarray(tokens), jnp.asarray(structure)))
      for compat in ("paper", "authors"))
  np.testing.assert_allclose(paper[..., :8], image, rtol=1e-5, atol=1e-5)  # [F_pa, F_s]
  np.testing.assert_allclose(authors[..., 8:], image, rtol=1e-5, atol=1e-5)  # [F_s, F_pa]
  np.testing.assert_array_equal(authors[..., :8], paper[..., 8:])


def test_authors_mode_needs_square_grids():
  stage = _stage("authors")
  variables = _stage_variables(stage)
  tokens = jnp.zeros((1, 2 * 4, 32))
  structure = jnp.zeros((1, 4, 8, 3))  # a 2 x 4 stage grid
  with pytest.raises(ValueError, match="square inputs"):
    nn.apply(lambda m, t, s: m.prompt(t, s, train=False), stage)(variables, tokens, structure)


def test_authors_model_outputs_depend_on_the_batch_mates():
  config = model_config("tiny", fgsa_compat="authors")
  model = build_model(config)
  variables = models.random_variables(abstract_variables(model, 64, batch=2), seed=6)
  images = np.random.default_rng(7).normal(size=(2, 64, 64, 3)).astype(np.float32)
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
  out = np.asarray(forward(variables, jnp.asarray(images)))
  assert out.shape == (2, 32, 32, 124) and np.isfinite(out).all()
  images[1] = images[1][::-1]
  moved = np.asarray(forward(variables, jnp.asarray(images)))
  assert not np.allclose(moved[0], out[0], rtol=0, atol=1e-6)


# -- BatchNorm running variance ------------------------------------------------------


@pytest.mark.parametrize("unbiased", [False, True])
def test_batch_norm_running_variance_against_numpy(unbiased):
  x = np.random.default_rng(8).normal(1.0, 2.0, size=(2, 3, 5, 4)).astype(np.float32)
  module = layers.batch_norm(dtype=jnp.float32, unbiased_variance=unbiased)
  variables = {"params": {"scale": jnp.asarray([1.0, 2.0, 0.5, 1.5]),
                          "bias": jnp.asarray([0.0, 0.1, -0.2, 0.3])},
               "batch_stats": {"mean": jnp.full((4,), 0.5), "var": jnp.full((4,), 2.0)}}
  y, updates = module.apply(variables, jnp.asarray(x), use_running_average=False,
                            mutable=["batch_stats"])
  n = 2 * 3 * 5
  mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))  # numpy var: biased
  scale, bias = np.asarray(variables["params"]["scale"]), np.asarray(variables["params"]["bias"])
  np.testing.assert_allclose(np.asarray(y), (x - mean) / np.sqrt(var + 1e-5) * scale + bias,
                             rtol=1e-5, atol=1e-5)
  stats = updates["batch_stats"]
  np.testing.assert_allclose(np.asarray(stats["mean"]), 0.9 * 0.5 + 0.1 * mean, rtol=1e-6)
  batch_var = var * n / (n - 1) if unbiased else var
  np.testing.assert_allclose(np.asarray(stats["var"]), 0.9 * 2.0 + 0.1 * batch_var, rtol=1e-6)
  # Eval mode normalises with the running statistics, the same way in both.
  y_eval = module.apply(variables, jnp.asarray(x), use_running_average=True)
  np.testing.assert_allclose(np.asarray(y_eval), (x - 0.5) / np.sqrt(2.0 + 1e-5) * scale + bias,
                             rtol=1e-5, atol=1e-5)


def test_unbiased_batch_norm_matches_flax_but_for_the_running_variance():
  x = jnp.asarray(np.random.default_rng(9).normal(size=(4, 6, 8)).astype(np.float32))
  flax_bn = layers.batch_norm(dtype=jnp.float32)
  ours = layers.batch_norm(dtype=jnp.float32, unbiased_variance=True)
  variables = flax_bn.init(jax.random.key(0), x, use_running_average=False)
  assert jax.tree.structure(variables) == jax.tree.structure(
      ours.init(jax.random.key(0), x, use_running_average=False))
  y_flax, new_flax = flax_bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  y_ours, new_ours = ours.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  np.testing.assert_array_equal(np.asarray(y_ours), np.asarray(y_flax))
  np.testing.assert_array_equal(np.asarray(new_ours["batch_stats"]["mean"]),
                                np.asarray(new_flax["batch_stats"]["mean"]))
  n = 4 * 6
  np.testing.assert_allclose(np.asarray(new_ours["batch_stats"]["var"]) - 0.9,
                             (np.asarray(new_flax["batch_stats"]["var"]) - 0.9) * n / (n - 1),
                             rtol=1e-5)


@pytest.mark.parametrize("unbiased", [False, True])
def test_the_switch_reaches_every_batch_norm_of_the_model(unbiased):
  config = model_config("tiny", fgsa_compat="authors", batch_norm_unbiased_variance=unbiased)
  assert model_config("paper").batch_norm_unbiased_variance is False
  model = build_model(config)
  variables = abstract_variables(model, 64, batch=2)
  seen = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
      seen.append(type(context.module))
    return next_fun(*args, **kwargs)

  images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"],
                                            rngs={"dropout": jax.random.key(0)}),
                   variables, images)
  expected = layers.UnbiasedVarianceBatchNorm if unbiased else nn.BatchNorm
  count = len(flatten_dict(variables["batch_stats"])) // 2  # mean and var per BatchNorm
  assert len(seen) >= count > 0
  assert set(seen) == {expected}
