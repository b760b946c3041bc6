"""Model structure tests that need no full-model compile (fgtbt_jax/models).

Shapes and parameter counts come from `jax.eval_shape`; numerics are checked
on single modules. Full-model forward tests are in test_model_forward.py,
cost counts in test_model_cost.py, sharding in test_model_sharding.py.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from fgtbt_jax.models import (
    ENCODERS, VARIANTS, abstract_variables, build_model, model_config, normalize_images,
    parameter_count)
from fgtbt_jax.models import decoder as decoder_lib
from fgtbt_jax.models import encoder as encoder_lib
from fgtbt_jax.models import fgsa as fgsa_lib
from fgtbt_jax.models import layers
from fgtbt_jax.models import mit
from fgtbt_jax.models.compute import Compute


def _shapes(config, size, batch=1):
  """(variables, output) shape structs from one abstract trace."""
  model = build_model(config)
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  out, variables = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.key(0), x, train=False), images)
  return variables, out


def _fgsa_count(params):
  flat = flatten_dict(nn.meta.unbox(params))
  return sum(int(np.prod(v.shape)) for k, v in flat.items() if "fgsa" in k)


def test_paper_config_parameter_count_matches_the_paper():
  variables, out = _shapes(model_config("paper"), 480)
  assert out.shape == (1, 240, 240, 124) and out.dtype == jnp.float32
  params = variables["params"]
  total = parameter_count(params)
  fgsa = _fgsa_count(params)
  encoder = parameter_count(params["encoder"]) - fgsa
  decoder = parameter_count(params["decoder"])
  assert abs(total - 53.5e6) / 53.5e6 < 0.01
  # SPEC 2.4 breakdown: encoder (conv-stem) 47.3 M, FGSA 2.5 M, head 3.8 M.
  assert encoder == 47_310_022 and fgsa == 2_468_934 and decoder == 3_847_808
  assert total == encoder + fgsa + decoder


@pytest.mark.parametrize("size", [64, 128, 256])
@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_output_shapes_small_variants(variant, size):
  _, out = _shapes(model_config(variant), size, batch=2)
  assert out.shape == (2, size // 2, size // 2, 124)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v not in ("tiny", "small")])
def test_output_shapes_and_widths_of_mit_variants(variant):
  config = model_config(variant)
  variables, out = _shapes(config, 64)
  assert out.shape == (1, 32, 32, 124)
  spec = ENCODERS[config.encoder]
  encoder = variables["params"]["encoder"]
  for i, (dim, depth) in enumerate(zip(spec.dims, spec.depths)):
    stage = encoder[f"stage_{i}"]
    assert sorted(k for k in stage if k.startswith("block_")) == sorted(
        f"block_{j}" for j in range(depth))
    assert stage["norm"]["scale"].value.shape == (dim,)
    assert stage["block_0"]["mlp"]["fc1"]["kernel"].value.shape == (dim, 4 * dim)
    assert stage["block_0"]["attention"]["kv"]["kernel"].value.shape == (dim, 2 * dim)
    assert ("sr" in stage["block_0"]["attention"]) == (spec.sr_ratios[i] > 1)
    assert len([k for k in stage["fgsa"] if k.startswith("reduce_")]) == depth


def test_fgsa_off_removes_every_fgsa_parameter():
  with_fgsa, _ = _shapes(model_config("tiny"), 64)
  without, out = _shapes(model_config("tiny", fgsa=False), 64)
  assert out.shape == (1, 32, 32, 124)
  assert _fgsa_count(without["params"]) == 0
  fgsa = _fgsa_count(with_fgsa["params"])
  assert fgsa > 0
  assert parameter_count(with_fgsa["params"]) - parameter_count(without["params"]) == fgsa


def test_fgsa_parameter_shapes_follow_the_spec():
  variables, _ = _shapes(model_config("paper"), 64)
  stage = variables["params"]["encoder"]["stage_2"]["fgsa"]  # C = 320, 18 blocks
  shapes = {"/".join(k): v.value.shape for k, v in flatten_dict(stage).items()}
  assert shapes["image_proj/kernel"] == (320, 80)
  assert shapes["channel_attention/squeeze/kernel"] == (480, 30)
  assert shapes["channel_attention/excite/kernel"] == (30, 480)
  assert shapes["conv/kernel"] == (480, 480) and shapes["conv/bias"] == (480,)
  assert shapes["reduce_17/kernel"] == (480, 80) and "reduce_18/kernel" not in shapes
  assert shapes["expand/kernel"] == (80, 320)
  assert shapes["refine/proj/kernel"] == (3, 3, 80, 80)  # conv stem, C / 4 wide
  stage0 = variables["params"]["encoder"]["stage_0"]["fgsa"]
  assert stage0["refine"]["conv_in"]["kernel"].value.shape == (1, 1, 3, 16)
  assert stage0["refine"]["proj"]["kernel"].value.shape == (7, 7, 16, 16)


def test_batch_norm_statistics_live_in_batch_stats():
  variables, _ = _shapes(model_config("tiny"), 64)
  stats = flatten_dict(variables["batch_stats"])
  assert ("decoder", "fuse_norm", "mean") in stats
  assert ("encoder", "stage_0", "patch_embed", "norm_in", "var") in stats
  assert ("encoder", "stage_0", "fgsa", "norm", "mean") in stats
  plain, _ = _shapes(model_config("tiny", patch_embed="plain", fgsa=False), 64)
  assert "encoder" not in plain["batch_stats"]


def test_every_parameter_has_logical_axis_names():
  variables, _ = _shapes(model_config("tiny"), 64)
  flat = flatten_dict(variables["params"])
  for path, leaf in flat.items():
    assert isinstance(leaf, nn.LogicallyPartitioned), path
    assert len(leaf.names) == leaf.value.ndim, path


def test_model_config_fields_and_errors():
  config = model_config("paper")
  assert (config.frequency_sigma, config.fgsa_reduction, config.num_points) == (20.0, 4, 124)
  assert (config.decoder_dim, config.head_channels, config.upsample_channels) == (768, 256, 128)
  assert (config.norm_epsilon, config.embed_norm_epsilon) == (1e-6, 1e-5)
  assert model_config("tiny", dtype="bfloat16").dtype == "bfloat16"
  with pytest.raises(ValueError, match="unknown model variant 'b9'"):
    model_config("b9")
  with pytest.raises(KeyError, match="unknown field 'depth'"):
    model_config("tiny", depth=3)
  for field, value in [("frequency_extractor", "dct"), ("patch_embed", "linear"),
                       ("encoder", "b7"), ("dtype", "float16"), ("attention_impl", "flash")]:
    with pytest.raises(ValueError, match=field):
      model_config("tiny", **{field: value})
  with pytest.raises(ValueError, match="multiple of 32"):
    model_config("tiny", input_size=100)
  with pytest.raises(ValueError, match="fgsa_reduction"):
    model_config("tiny", fgsa_reduction=3)


def test_model_rejects_bad_input_shapes():
  model = build_model(model_config("tiny"))
  with pytest.raises(ValueError, match="not a multiple of 32"):
    abstract_variables(model, (64, 80))
  with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x),
                   jax.ShapeDtypeStruct((1, 64, 64, 1), jnp.float32))


def test_normalize_images_known_values():
  images = np.zeros((1, 2, 2, 3), np.uint8)
  images[0, 0, 0] = (255, 255, 255)
  out = normalize_images(images)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out[0, 1, 1], [-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225],
                             rtol=1e-6)
  np.testing.assert_allclose(out[0, 0, 0], [0.515 / 0.229, 0.544 / 0.224, 0.594 / 0.225],
                             rtol=1e-6)
  np.testing.assert_allclose(normalize_images(images.astype(np.float32)), out)
  with pytest.raises(ValueError, match="RGB"):
    normalize_images(np.zeros((2, 2, 4)))


# --- high-frequency extractors ---------------------------------------------


def _literal_fft_high_frequency(image, sigma):
  """Paper eq. 17-20 written out with numpy, channel by channel."""
  h, w, c = image.shape
  i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  mask = 1 - np.exp(-((i - h // 2) ** 2 + (j - w // 2) ** 2) / (2 * sigma**2))
  out = np.empty_like(image)
  for k in range(c):
    shifted = np.fft.fftshift(np.fft.fft2(image[..., k])) * mask
    out[..., k] = np.abs(np.real(np.fft.ifft2(np.fft.ifftshift(shifted))))
  return out


def test_fft_high_frequency_matches_the_paper_formula():
  # sigma 20 is defined at 480 x 480; at 48 x 48 it scales to 20 * 48 / 480 = 2.
  square = np.random.RandomState(0).randn(48, 48, 3).astype(np.float32)
  got = fgsa_lib.fft_high_frequency(jnp.asarray(square)[None], sigma=20.0)[0]
  np.testing.assert_allclose(got, _literal_fft_high_frequency(square, 2.0), atol=1e-4)
  at_480 = np.random.RandomState(1).randn(480, 480, 1).astype(np.float32)
  np.testing.assert_allclose(
      fgsa_lib.fft_high_frequency(jnp.asarray(at_480)[None], sigma=20.0)[0],
      _literal_fft_high_frequency(at_480, 20.0), atol=1e-4)


def test_gaussian_mask_is_zero_at_the_centre_and_near_one_far_away():
  mask = fgsa_lib.gaussian_highpass_mask(480, 480, 20.0, 20.0)
  assert mask[240, 240] == 0.0
  assert mask[0, 0] > 0.999
  assert mask[240, 260] == pytest.approx(1 - np.exp(-0.5))


def _step_edge(size=64, column=32):
  image = np.zeros((1, size, size, 3), np.float32)
  image[:, :, column:] = 2.0
  return jnp.asarray(image)


@pytest.mark.parametrize("extractor", fgsa_lib.FREQUENCY_EXTRACTORS)
def test_constant_image_has_no_high_frequency(extractor):
  constant = jnp.full((1, 64, 64, 3), 1.7, jnp.float32)
  out = np.asarray(fgsa_lib.high_frequency_image(constant, extractor, 20.0))
  assert out.shape == (1, 64, 64, 3)
  # SRM uses zero padding, which makes the image border an edge: check inside.
  inner = out[:, 2:-2, 2:-2] if extractor == "srm" else out
  assert np.abs(inner).max() < 1e-5


@pytest.mark.parametrize("extractor", fgsa_lib.FREQUENCY_EXTRACTORS)
def test_step_edge_response_peaks_at_the_edge(extractor):
  # The wavelet band sees an edge only inside a 2x2 block: use an odd column.
  column = 33 if extractor == "wavelet" else 32
  out = np.abs(np.asarray(fgsa_lib.high_frequency_image(_step_edge(column=column), extractor, 20.0)))
  profile = out[0, 16:48, 4:60].mean(axis=(0, 2))  # interior rows, away from borders
  peak = int(np.argmax(profile)) + 4
  assert abs(peak - column) <= 1
  assert profile.max() > 10 * profile[:10].mean() + 1e-6


def test_wavelet_rejects_odd_sizes_and_unknown_extractor_raises():
  with pytest.raises(ValueError, match="even"):
    fgsa_lib.wavelet_high_frequency(jnp.zeros((1, 5, 6, 3)))
  with pytest.raises(ValueError, match="unknown frequency_extractor 'dct'"):
    fgsa_lib.high_frequency_image(jnp.zeros((1, 8, 8, 3)), "dct", 20.0)


def test_channel_attention_pools_each_sample_separately():
  module = fgsa_lib.ChannelAttention(reduction=4)
  x = jax.random.normal(jax.random.key(0), (3, 10, 8))
  params = module.init(jax.random.key(1), x)
  both = module.apply(params, x)
  alone = module.apply(params, x[1:2])
  np.testing.assert_allclose(both[1:2], alone, rtol=1e-6, atol=1e-6)


# --- module numerics ---------------------------------------------------------


def test_initializers_have_the_requested_distributions():
  normal = np.asarray(layers.normal(0.5)(jax.random.key(0), (400, 500)))
  assert abs(normal.std() - 0.5) < 0.005 and abs(normal.mean()) < 0.005
  assert abs(np.mean(np.abs(normal) > 1.0) - 0.0455) < 0.002  # beyond 2 std
  truncated = np.asarray(layers.truncated_normal(0.02)(jax.random.key(1), (400, 500)))
  assert abs(truncated.std() - 0.02) < 2e-4 and abs(truncated.mean()) < 2e-4
  bound = 2 * 0.02 / 0.87962566103423978
  assert np.abs(truncated).max() <= bound and np.abs(truncated).max() > 0.98 * bound
  same = layers.normal(1.0)(jax.random.key(0), (400, 500))
  np.testing.assert_array_equal(same, normal / 0.5)
  other = np.asarray(layers.normal(1.0)(jax.random.key(2), (400, 500)))
  assert abs(np.corrcoef(other.ravel(), normal.ravel())[0, 1]) < 0.01
  legacy = layers.normal(1.0)(jax.random.PRNGKey(0), (3,))  # raw uint32 keys work too
  assert legacy.shape == (3,) and np.isfinite(legacy).all()


def _attention(impl, grid=(8, 8), sr=2):
  return mit.EfficientSelfAttention(dim=32, num_heads=2, sr_ratio=sr, grid=grid,
                                    compute=Compute(attention=impl))


@pytest.mark.parametrize("sr", [1, 2])
def test_fused_attention_equals_einsum_reference(sr):
  x = jax.random.normal(jax.random.key(0), (2, 64, 32))
  variables = jax.jit(_attention("einsum", sr=sr).init)(jax.random.key(1), x)

  def loss(variables, impl):
    return jnp.sum(jnp.sin(_attention(impl, sr=sr).apply(variables, x)))

  @jax.jit
  def loss_and_grads(variables):
    return [jax.value_and_grad(loss)(variables, impl) for impl in ("einsum", "xla")]

  (ref, ref_grad), (got, got_grad) = loss_and_grads(variables)
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got_grad), jax.tree.leaves(ref_grad)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_attention_matches_a_direct_softmax():
  q = jax.random.normal(jax.random.key(0), (1, 5, 2, 4))
  k = jax.random.normal(jax.random.key(1), (1, 3, 2, 4))
  v = jax.random.normal(jax.random.key(2), (1, 3, 2, 4))
  out = mit.attention_core(q, k, v, "xla")
  for head in range(2):
    logits = q[0, :, head] @ k[0, :, head].T / 2.0
    weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(out[0, :, head], weights @ v[0, :, head], rtol=1e-5)
  with pytest.raises(ValueError, match="unknown attention_impl"):
    mit.attention_core(q, k, v, "flash")


def test_remat_gives_the_same_outputs_and_gradients():
  kwargs = dict(dim=16, depth=2, num_heads=1, sr_ratio=2, patch_size=3, stride=2,
                drop_path_rates=(0.0, 0.1), patch_embed="plain")
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 8))
  structure = None
  plain = encoder_lib.EncoderStage(**kwargs)
  remat = encoder_lib.EncoderStage(**kwargs, compute=Compute(remat_blocks=True))
  variables = jax.jit(plain.init, static_argnums=3)(jax.random.key(2), x, structure, False)

  @jax.jit
  def loss_and_grads(params):
    return [jax.value_and_grad(loss)(params, module) for module in (plain, remat)]

  def loss(params, module):
    (out, _), _ = module.apply(
        {**variables, "params": params}, x, structure, True,
        rngs={"dropout": jax.random.key(3)}, mutable=["batch_stats"])
    return jnp.sum(out**2)

  (ref, ref_grad), (got, got_grad) = loss_and_grads(variables["params"])
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got_grad), jax.tree.leaves(ref_grad)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_drop_path_drops_whole_samples_and_keeps_the_mean():
  x = jnp.ones((4000, 3, 2))
  module = layers.DropPath(0.25)
  out = module.apply({}, x, True, rngs={"dropout": jax.random.key(0)})
  per_sample = np.asarray(out).reshape(4000, -1)
  np.testing.assert_allclose(np.unique(per_sample), [0.0, 1 / 0.75], rtol=1e-6)
  assert np.all(per_sample.min(1) == per_sample.max(1))  # all or nothing per sample
  assert abs(per_sample.mean() - 1.0) < 0.05
  np.testing.assert_array_equal(module.apply({}, x, False), x)
  with pytest.raises(Exception, match="dropout"):
    module.apply({}, x, True)


def test_drop_path_rates_rise_linearly_over_all_blocks():
  rates = encoder_lib.drop_path_rates((2, 1, 3, 1), 0.6)
  assert [len(r) for r in rates] == [2, 1, 3, 1]
  np.testing.assert_allclose(sum(rates, ()), [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])


def test_conv_stem_patch_embed_output_grid_and_layers():
  x = jnp.ones((1, 32, 32, 3))
  module = mit.OverlapPatchEmbed(16, 7, 4, kind="conv_stem")
  (tokens, grid), variables = module.init_with_output(jax.random.key(0), x, False)
  assert grid == (8, 8) and tokens.shape == (1, 64, 16)
  assert set(variables["params"]) == {"norm_in", "conv_in", "norm_mid", "proj", "norm_out",
                                      "conv_out", "norm"}
  assert "bias" not in variables["params"]["conv_in"]
  with pytest.raises(ValueError, match="unknown patch_embed"):
    mit.OverlapPatchEmbed(16, 7, 4, kind="linear").init(jax.random.key(0), x, False)


def test_gelu_is_the_exact_gelu_with_its_derivative_written_out():
  x = jnp.linspace(-6.0, 6.0, 241)
  weights = jnp.cos(jnp.arange(241.0))
  for dtype in (jnp.float32, jnp.bfloat16):
    xd = x.astype(dtype)
    out = layers.gelu(xd)
    assert out.dtype == dtype
    np.testing.assert_array_equal(np.asarray(out, np.float32),
                                  np.asarray(nn.gelu(xd, approximate=False), np.float32))
    grad = jax.grad(lambda v: jnp.sum(layers.gelu(v).astype(jnp.float32) * weights))(xd)
    assert grad.dtype == dtype
    # Phi(x) + x phi(x), from float64.
    x64 = np.asarray(xd, np.float64)
    phi = np.exp(-0.5 * x64 ** 2) / np.sqrt(2 * np.pi)
    cdf = 0.5 * (1.0 + np.vectorize(math.erf)(x64 / np.sqrt(2)))
    expected = (cdf + x64 * phi) * np.asarray(weights, np.float64)
    np.testing.assert_allclose(np.asarray(grad, np.float64), expected,
                               atol=1e-6 if dtype == jnp.float32 else 1e-2)
  # The same gradient as differentiating the erfc formula (float32).
  reference = jax.grad(lambda v: jnp.sum(nn.gelu(v, approximate=False) * weights))(x)
  np.testing.assert_allclose(jax.grad(lambda v: jnp.sum(layers.gelu(v) * weights))(x), reference,
                             rtol=1e-6, atol=1e-6)


class _ConvThenNorm(nn.Module):
  """norm_mid(conv_in(x)) as two layers, or folded (`layers.pointwise_conv_batch_norm`)."""

  folded: bool
  unbiased: bool
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x, train):
    conv = layers.conv(8, 1, "embed", use_bias=False, dtype=self.dtype, name="conv_in")
    norm = layers.batch_norm(dtype=self.dtype, unbiased_variance=self.unbiased, name="norm_mid")
    if self.folded:
      return layers.pointwise_conv_batch_norm(conv, norm, x, train)
    return norm(conv(x), use_running_average=not train)


@pytest.mark.parametrize("unbiased", [False, True])
def test_folded_stem_batch_norm_is_the_batch_norm_of_the_convolution(unbiased):
  # An image-like input (3 channels, non-zero means, correlated channels).
  x = jax.random.normal(jax.random.key(0), (2, 9, 11, 3)) @ jnp.array(
      [[1.0, 0.3, 0.0], [0.0, 2.0, -0.5], [0.2, 0.0, 0.7]]) + jnp.array([0.5, -1.0, 2.0])
  two, folded = _ConvThenNorm(False, unbiased), _ConvThenNorm(True, unbiased)
  variables = two.init(jax.random.key(1), x, False)
  # The same variables under the same names.
  assert jax.tree.structure(folded.init(jax.random.key(1), x, False)) == jax.tree.structure(
      variables)
  variables = jax.tree.map(  # Non-trivial BatchNorm parameters and running statistics.
      lambda v: v + 0.3 * jax.random.normal(jax.random.key(v.size), v.shape) if v.ndim == 1
      else v, nn.meta.unbox(variables))
  for train in (True, False):
    def loss(params, module):
      out, updates = module.apply({**variables, "params": params}, x, train,
                                  mutable=["batch_stats"])
      return jnp.sum(jnp.sin(out) * jnp.arange(out.size).reshape(out.shape) / out.size), (
          out, updates)
    (l_two, (out_two, upd_two)), g_two = jax.value_and_grad(loss, has_aux=True)(
        variables["params"], two)
    (l_fold, (out_fold, upd_fold)), g_fold = jax.value_and_grad(loss, has_aux=True)(
        variables["params"], folded)
    np.testing.assert_allclose(out_fold, out_two, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l_fold, l_two, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_fold), jax.tree.leaves(g_two)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())
    for a, b in zip(jax.tree.leaves(upd_fold), jax.tree.leaves(upd_two)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    if train:  # The running statistics moved, by the batch's (unbiased) variance if asked.
      assert not np.allclose(upd_fold["batch_stats"]["norm_mid"]["var"],
                             variables["batch_stats"]["norm_mid"]["var"])
  # bfloat16: within bfloat16's rounding of the two-layer form.
  out = {f: _ConvThenNorm(f, unbiased, jnp.bfloat16).apply(variables, x, True,
                                                           mutable=["batch_stats"])[0]
         for f in (False, True)}
  assert out[True].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out[True], np.float32), np.asarray(out[False], np.float32),
                             rtol=2e-2, atol=3e-2)
  with pytest.raises(ValueError, match="5 input channels"):
    _ConvThenNorm(True, unbiased).init(jax.random.key(1), jnp.ones((1, 4, 4, 5)), False)


# --- PyTorch semantics of the upsampling ops ----------------------------------


def test_conv_transpose_matches_pytorch():
  torch = pytest.importorskip("torch")
  rng = np.random.RandomState(0)
  x = rng.randn(2, 5, 6, 3).astype(np.float32)
  weight = rng.randn(3, 4, 4, 4).astype(np.float32)  # PyTorch (in, out, kh, kw)
  bias = rng.randn(4).astype(np.float32)
  layer = torch.nn.ConvTranspose2d(3, 4, 4, stride=2, padding=1)
  with torch.no_grad():
    layer.weight.copy_(torch.from_numpy(weight))
    layer.bias.copy_(torch.from_numpy(bias))
    expected = layer(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  module = layers.conv_transpose(4, 4, 2, 1, "decoder", dtype=jnp.float32)
  kernel = weight[:, :, ::-1, ::-1].transpose(2, 3, 0, 1)
  got = module.apply({"params": {"kernel": kernel, "bias": bias}}, x)
  assert got.shape == (2, 10, 12, 4)
  np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("out_size", [(12, 20), (2, 3), (3, 5)])
def test_bilinear_resize_matches_pytorch_align_corners_false(out_size):
  torch = pytest.importorskip("torch")
  x = np.random.RandomState(0).randn(1, 3, 5, 2).astype(np.float32)
  got = decoder_lib.resize_bilinear(jnp.asarray(x), *out_size)
  expected = torch.nn.functional.interpolate(
      torch.from_numpy(x).permute(0, 3, 1, 2), size=out_size, mode="bilinear",
      align_corners=False).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(got, expected, atol=1e-5)


def test_bilinear_matrix_rows_sum_to_one_and_upsampling_by_4_is_known():
  weights = decoder_lib.bilinear_matrix(2, 8)
  np.testing.assert_allclose(weights.sum(1), 1.0)
  # Output pixel 2 sits at source 0.125: 7/8 of pixel 0, 1/8 of pixel 1.
  np.testing.assert_allclose(weights[2], [0.875, 0.125])
  np.testing.assert_allclose(weights[0], [1.0, 0.0])  # clamped at the border


def test_conv_block_shapes_and_shortcut():
  module = decoder_lib.ConvBlock(8)
  x = jnp.ones((1, 4, 4, 16))
  out, variables = module.init_with_output(jax.random.key(0), x, False)
  assert out.shape == (1, 4, 4, 8)
  params = variables["params"]
  assert params["conv1"]["kernel"].value.shape == (1, 1, 16, 4)
  assert params["conv2"]["kernel"].value.shape == (3, 3, 4, 4)
  assert params["conv3"]["kernel"].value.shape == (1, 1, 4, 8)
  assert params["shortcut"]["kernel"].value.shape == (1, 1, 16, 8)
  same = decoder_lib.ConvBlock(16).init(jax.random.key(0), x, False)
  assert "shortcut" not in same["params"]


def test_composed_decoder_fusion_is_the_concatenated_one_in_fewer_operations():
  """Same parameters (tree and init), same outputs and gradients within rounding."""
  config = model_config("tiny")
  composed, concat = build_model(config), build_model(model_config("tiny", decoder_fusion="concat"))
  images = jax.random.uniform(jax.random.key(1), (2, 64, 64, 3))
  # Jitted: op by op, the gradients alone took minutes on two cores.
  init = lambda m: jax.jit(lambda x: m.init(jax.random.key(0), x, train=False))(images)
  variables, reference = init(composed), init(concat)
  assert jax.tree.structure(variables) == jax.tree.structure(reference)
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(a, b)
  outputs = [np.asarray(jax.jit(lambda v: m.apply(v, images, train=False))(variables))
             for m in (composed, concat)]
  np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-4, atol=1e-5 * np.abs(outputs[1]).max())

  def grads(model):
    loss = lambda p: jnp.sum(model.apply({**variables, "params": p}, images, train=False) ** 2)
    return jax.jit(jax.grad(loss))(variables["params"])
  for a, b in zip(jax.tree.leaves(grads(composed)), jax.tree.leaves(grads(concat))):
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-4 * (np.abs(b).max() + 1e-12))
  with pytest.raises(ValueError, match="decoder_fusion='sum'"):
    model_config("small", decoder_fusion="sum")


def test_pointwise_convolution_as_a_matmul_is_the_1x1_convolution():
  x = jax.random.normal(jax.random.key(0), (2, 5, 7, 12))
  for dtype in (jnp.float32, jnp.bfloat16):
    for use_bias in (True, False):
      layer = {impl: layers.conv(6, 1, "decoder", dtype=dtype, use_bias=use_bias,
                                 pointwise=impl, name="c") for impl in ("dot", "conv")}
      assert isinstance(layer["dot"], layers.PointwiseConv)
      assert isinstance(layer["conv"], nn.Conv)
      variables = {impl: layer[impl].init(jax.random.key(1), x) for impl in layer}
      # The same parameters, initial values and logical axis names.
      assert jax.tree.structure(variables["dot"]) == jax.tree.structure(variables["conv"])
      for a, b in zip(jax.tree.leaves(variables["dot"]), jax.tree.leaves(variables["conv"])):
        np.testing.assert_array_equal(a, b)
      assert nn.get_partition_spec(variables["dot"]) == nn.get_partition_spec(variables["conv"])
      out = {impl: layer[impl].apply(variables["conv"], x) for impl in layer}
      assert out["dot"].dtype == out["conv"].dtype == dtype
      np.testing.assert_allclose(np.asarray(out["dot"], np.float32),
                                 np.asarray(out["conv"], np.float32),
                                 rtol=1e-2 if dtype == jnp.bfloat16 else 1e-5, atol=1e-5)
  # Only 1x1 convolutions with stride 1, no padding and no groups become matmuls.
  for kwargs in ({"kernel_size": 3, "padding": 1}, {"kernel_size": 1, "strides": 2},
                 {"kernel_size": 1, "padding": 1}):
    assert isinstance(layers.conv(6, out_axis="decoder", dtype=jnp.float32, **kwargs), nn.Conv)
  with pytest.raises(ValueError, match="pointwise_impl 'fft'"):
    layers.conv(6, 1, "decoder", dtype=jnp.float32, pointwise="fft")
  with pytest.raises(ValueError, match="pointwise_impl='fft'"):
    model_config("tiny", pointwise_impl="fft")
  # The whole model (FGSA and conv stems, decoder, HIH's decimal head): same
  # parameters, outputs and gradients with either implementation.
  images = jax.random.uniform(jax.random.key(3), (2, 64, 64, 3))
  models_ = {impl: build_model(model_config("tiny", head="hih", depthwise_impl="conv",
                                            pointwise_impl=impl))
             for impl in ("conv", "dot")}
  variables = jax.jit(lambda x: models_["conv"].init(jax.random.key(0), x, train=False))(images)
  assert jax.tree.structure(variables) == jax.tree.structure(
      abstract_variables(models_["dot"], 64, batch=2))

  def grads(model):
    def loss(p):
      out = model.apply({**variables, "params": p}, images, train=False, method="named_outputs")
      return sum(jnp.sum(v.astype(jnp.float32) ** 2) for v in jax.tree.leaves(out))
    return jax.jit(jax.value_and_grad(loss))(variables["params"])
  (loss_conv, g_conv), (loss_dot, g_dot) = grads(models_["conv"]), grads(models_["dot"])
  np.testing.assert_allclose(loss_conv, loss_dot, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_dot), jax.tree.leaves(g_conv)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * (np.abs(b).max() + 1e-12))


def test_depthwise_convolution_as_shifted_multiply_adds_is_the_grouped_convolution():
  x = jax.random.normal(jax.random.key(0), (2, 5, 7, 12))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 1, 12))
  bias = jax.random.normal(jax.random.key(2), (12,))
  def grouped(x, kernel, bias):
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=12) + bias
  np.testing.assert_allclose(mit.depthwise_conv3x3_shifts(x, kernel, bias), grouped(x, kernel, bias),
                             rtol=1e-5, atol=1e-5)
  # The whole model: same parameters, outputs and gradients with either implementation.
  images = jax.random.uniform(jax.random.key(3), (2, 64, 64, 3))
  models_ = {impl: build_model(model_config("tiny", depthwise_impl=impl))
             for impl in ("conv", "shifts")}
  variables = jax.jit(lambda x: models_["conv"].init(jax.random.key(0), x, train=False))(images)
  assert jax.tree.structure(variables) == jax.tree.structure(
      abstract_variables(models_["shifts"], 64, batch=2))
  def grads(model):  # jitted: op by op it took minutes on two cores
    loss = lambda p: jnp.sum(model.apply({**variables, "params": p}, images, train=False) ** 2)
    return jax.jit(jax.value_and_grad(loss))(variables["params"])
  (loss_conv, g_conv), (loss_shifts, g_shifts) = grads(models_["conv"]), grads(models_["shifts"])
  np.testing.assert_allclose(loss_conv, loss_shifts, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_shifts), jax.tree.leaves(g_conv)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * (np.abs(b).max() + 1e-12))
  assert mit.resolve_depthwise_impl("auto") == ("shifts" if jax.default_backend() == "cpu"
                                                else "conv")
  with pytest.raises(ValueError, match="depthwise_impl='fft'"):
    model_config("tiny", depthwise_impl="fft")
