"""Layer constructors with logical axis names, and stochastic depth.

Every parameter the model creates goes through one of these constructors so
that it carries logical axis names (see `sharding.py`) and the model-wide
initialisation: truncated normal (std 0.02) for linear layers as in MiT, and
He normal over fan-out (`sqrt(2 / (k * k * out / groups))`) for
convolutions, as in the MiT and SegFormer PyTorch code.

The random initialisers draw their bits with XLA's RngBitGenerator (Philox)
seeded from the key Flax gives each parameter, instead of `jax.random`'s
Threefry hash: the values are as random, but `jax.jit(model.init)` compiles in
half the CPU time (one generator op per tensor instead of an unrolled hash;
paper model: minutes on a 2-core CPU otherwise).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fgtbt_jax.models import remat

Dtype = Any

# PyTorch BatchNorm momentum 0.1 means new = 0.9 old + 0.1 batch in Flax terms.
BATCH_NORM_MOMENTUM = 0.9
BATCH_NORM_EPSILON = 1e-5
# The most input channels `pointwise_conv_batch_norm` takes (it computes the
# 1x1 convolution as multiply-adds): an image's.
POINTWISE_FMA_CHANNELS = 4
# Name scope of those multiply-adds: the MAC counter (`cost.py`) counts its
# products as the 1x1 convolution's.
POINTWISE_FMA_SCOPE = "pointwise_fma"

# Standard-normal quantiles of the truncation points (-2, 2) and the std of
# the truncated distribution, as in `nn.initializers.truncated_normal`.
_PHI_MINUS_2 = 0.5 * math.erfc(2.0 / math.sqrt(2.0))
_TRUNCATED_STD = 0.87962566103423978


def _uniform(key: jax.Array, shape: Sequence[int]) -> jax.Array:
  """Uniform float32 in (0, 1) from Philox bits seeded by `key`."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  words = key.reshape(-1).astype(jnp.uint32)
  state = jnp.concatenate([words, jnp.zeros((4,), jnp.uint32)])[:4]
  _, bits = jax.lax.rng_bit_generator(
      state, tuple(shape), dtype=jnp.uint32, algorithm=jax.lax.RandomAlgorithm.RNG_PHILOX)
  mantissa = (bits >> 9).astype(jnp.float32)  # 23 random bits
  return (mantissa + 0.5) * (1.0 / (1 << 23))


def truncated_normal(stddev: float):
  """N(0, stddev^2) truncated to +-2 std (rescaled to keep `stddev`), by inverse CDF."""
  def init(key, shape, dtype=jnp.float32):
    u = _PHI_MINUS_2 + (1.0 - 2.0 * _PHI_MINUS_2) * _uniform(key, shape)
    z = math.sqrt(2.0) * jax.lax.erf_inv(2.0 * u - 1.0)
    return (z * (stddev / _TRUNCATED_STD)).astype(dtype)
  return init


def normal(stddev: float):
  """N(0, stddev^2) by inverse CDF."""
  def init(key, shape, dtype=jnp.float32):
    z = math.sqrt(2.0) * jax.lax.erf_inv(2.0 * _uniform(key, shape) - 1.0)
    return (z * stddev).astype(dtype)
  return init


_LINEAR_INIT = truncated_normal(stddev=0.02)


def _named(init, names: tuple[str | None, ...]):
  return nn.with_logical_partitioning(init, names)


def dense(features: int, in_axis: str, out_axis: str, *, dtype: Dtype,
          use_bias: bool = True, name: str | None = None) -> nn.Dense:
  """Linear layer with (in_axis, out_axis) kernel names and (out_axis,) bias."""
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
      kernel_init=_named(_LINEAR_INIT, (in_axis, out_axis)),
      bias_init=_named(nn.initializers.zeros_init(), (out_axis,)),
      name=name)


def _conv_init(kernel_size: Sequence[int], features: int, groups: int):
  fan_out = math.prod(kernel_size) * features // groups
  return normal(stddev=math.sqrt(2.0 / fan_out))


# How a 1x1 convolution (stride 1, no padding, no groups) is computed:
# "conv", XLA's convolution (`nn.Conv`, the default), or "dot", a matmul over
# the channel axis (`PointwiseConv`). The same function and parameters. Alone,
# XLA:CPU runs a 1x1 convolution's gradient 1.1-5x slower than the matmul's,
# but in the whole train step "dot" measured 0.97-1.03x on CPU and moved XLA's
# memory by -3 % (float32) / +2 % (bfloat16) (benchmarks/README.md, "Exact
# rewrites"), so the default stays "conv" until a GPU or TPU measures it.
POINTWISE_IMPLEMENTATIONS = ("conv", "dot")


class PointwiseConv(nn.Module):
  """A 1x1 convolution computed as a matmul over the channel axis.

  The parameters are those of `nn.Conv` with a (1, 1) kernel, made by the
  same initialisers in the same order (kernel (1, 1, in, features), then
  bias), so checkpoints and initial values are the same; the output equals
  the convolution's within float rounding. Inputs and parameters are cast to
  `dtype` as `nn.Conv` does.
  """

  features: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  kernel_init: Any = None
  bias_init: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features),
                        jnp.float32)
    bias = (self.param("bias", self.bias_init, (self.features,), jnp.float32)
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = jax.lax.dot_general(x, kernel[0, 0], (((x.ndim - 1,), (0,)), ((), ())))
    return y if bias is None else y + bias


def conv(features: int, kernel_size: int, out_axis: str, *, dtype: Dtype,
         strides: int = 1, padding: int | str = 0, groups: int = 1,
         use_bias: bool = True, zero_init: bool = False, pointwise: str = "conv",
         name: str | None = None) -> nn.Module:
  """Square 2-D convolution on NHWC maps, PyTorch-style symmetric padding.

  Args:
    features: output channels.
    kernel_size: k of the k x k kernel.
    out_axis: logical name of the output-channel dimension.
    dtype: compute dtype.
    strides: stride in both directions.
    padding: symmetric zero padding in pixels, or "VALID".
    groups: feature groups (= channels for a depthwise convolution).
    use_bias: whether to add a bias.
    zero_init: start the kernel at zero (a residual branch that begins as
      the identity) instead of the fan-in initialiser.
    pointwise: how a 1x1 convolution with stride 1, no padding and no groups
      is computed (`POINTWISE_IMPLEMENTATIONS`): "dot" (`PointwiseConv`) or
      "conv" (`nn.Conv`); other convolutions are always `nn.Conv`.
    name: module name.

  Raises:
    ValueError: unknown `pointwise`.
  """
  if pointwise not in POINTWISE_IMPLEMENTATIONS:
    raise ValueError(f"unknown pointwise_impl {pointwise!r}; expected one of "
                     f"{POINTWISE_IMPLEMENTATIONS}")
  kernel = (kernel_size, kernel_size)
  kernel_init = _named(nn.initializers.zeros_init() if zero_init
                       else _conv_init(kernel, features, groups),
                       ("conv_height", "conv_width", "conv_in", out_axis))
  bias_init = _named(nn.initializers.zeros_init(), (out_axis,))
  if (pointwise == "dot" and kernel_size == 1 and strides == 1 and groups == 1
      and padding in (0, "VALID")):
    return PointwiseConv(features, use_bias=use_bias, dtype=dtype, kernel_init=kernel_init,
                         bias_init=bias_init, name=name)
  pad = padding if isinstance(padding, str) else ((padding, padding), (padding, padding))
  return nn.Conv(
      features, kernel, strides=(strides, strides), padding=pad,
      feature_group_count=groups, use_bias=use_bias, dtype=dtype,
      param_dtype=jnp.float32, kernel_init=kernel_init, bias_init=bias_init, name=name)


def bound_params(layer: nn.Module, input_shape: Sequence[int], dtype: Dtype) -> dict:
  """The (unboxed) parameters of `layer`, created at init as its own call would.

  Calls it once on an empty (zero-row) input of `input_shape` (first axis
  replaced by 0): the parameter tree and initialisation stay the layer's,
  nothing is computed, and the caller can apply the weights another way.
  """
  layer(jnp.zeros((0, *input_shape[1:]), dtype))
  return nn.meta.unbox(layer.variables["params"])


def conv_transpose(features: int, kernel_size: int, stride: int, padding: int,
                   out_axis: str, *, dtype: Dtype, name: str | None = None) -> nn.ConvTranspose:
  """Transposed convolution with PyTorch `ConvTranspose2d` semantics.

  PyTorch's `ConvTranspose2d(k, stride=s, padding=p)` gives an output of
  `(H - 1) s - 2 p + k` pixels; it equals a plain convolution over the input
  dilated by s and zero-padded by `k - 1 - p` on each side, with the
  spatially flipped kernel. Flax's `ConvTranspose` (with
  `transpose_kernel=False`) is exactly that dilated convolution without the
  flip, so a PyTorch weight `w` of shape (in, out, k, k) maps to the Flax
  kernel `w[:, :, ::-1, ::-1].transpose(2, 3, 0, 1)`. For k = 4, s = 2,
  p = 1 the output is exactly 2 H x 2 W.
  """
  kernel = (kernel_size, kernel_size)
  edge = kernel_size - 1 - padding
  return nn.ConvTranspose(
      features, kernel, strides=(stride, stride),
      padding=((edge, edge), (edge, edge)), dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=_named(_conv_init(kernel, features, 1),
                         ("conv_height", "conv_width", "conv_in", out_axis)),
      bias_init=_named(nn.initializers.zeros_init(), (out_axis,)),
      name=name)


def layer_norm(epsilon: float, *, dtype: Dtype, name: str | None = None,
               recompute: bool = False) -> nn.LayerNorm:
  """LayerNorm over the last axis (statistics in float32).

  recompute: keep only its input for the backward pass and recompute it there
  (`remat.recompute_in_backward`); the same variables.
  """
  return remat.recompute_module(nn.LayerNorm, enabled=recompute)(
      epsilon=epsilon, dtype=dtype, param_dtype=jnp.float32,
      scale_init=_named(nn.initializers.ones_init(), ("norm",)),
      bias_init=_named(nn.initializers.zeros_init(), ("norm",)),
      name=name)


def running_statistics(norm: nn.BatchNorm, running_mean: jax.Array, running_var: jax.Array,
                       mean: jax.Array, var: jax.Array,
                       shape: Sequence[int]) -> tuple[jax.Array, jax.Array]:
  """`norm`'s running mean and variance after a training batch of `shape` with these statistics.

  The momentum update, with the unbiased batch variance (var * n / (n - 1)
  over the n values of a channel) for an `UnbiasedVarianceBatchNorm`, the
  biased one otherwise (`nn.BatchNorm`).
  """
  m = norm.momentum
  if isinstance(norm, UnbiasedVarianceBatchNorm):
    count = math.prod(shape[:-1])
    if count < 2:
      raise ValueError(f"BatchNorm: the unbiased variance needs more than one value per "
                       f"channel in training, got an input of shape {tuple(shape)}")
    return (m * running_mean + (1 - m) * mean,
            m * running_var + (1 - m) * var * (count / (count - 1)))
  return m * running_mean + (1 - m) * mean, m * running_var + (1 - m) * var


class UnbiasedVarianceBatchNorm(nn.BatchNorm):
  """`nn.BatchNorm` whose running variance takes the unbiased batch variance.

  Both normalise a training batch with its biased variance (mean of squared
  deviations); PyTorch then updates the running variance with the unbiased
  one, var * n / (n - 1) over the n values of a channel, where Flax uses the
  biased one. Same variables, normalisation and running mean as
  `nn.BatchNorm` (over the last axis, float32 statistics); `axis_name` and
  `mask` are not supported.
  """

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    if self.axis != -1 or self.axis_name is not None:
      raise ValueError("UnbiasedVarianceBatchNorm normalises the last axis, without axis_name")
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average)
    features = x.shape[-1]
    reduction_axes = tuple(range(x.ndim - 1))
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      values = x.astype(jnp.promote_types(self.dtype or x.dtype, jnp.float32))
      mean = values.mean(reduction_axes)
      var = jnp.maximum(0.0, jax.lax.square(values).mean(reduction_axes) - jax.lax.square(mean))
      if not self.is_initializing():
        ra_mean.value, ra_var.value = running_statistics(
            self, ra_mean.value, ra_var.value, mean, var, x.shape)
    scale = self.param("scale", self.scale_init, (features,), self.param_dtype)
    bias = self.param("bias", self.bias_init, (features,), self.param_dtype)
    y = (x - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
    return y.astype(self.dtype or y.dtype)


def batch_norm(*, dtype: Dtype, unbiased_variance: bool = False,
               name: str | None = None) -> nn.BatchNorm:
  """BatchNorm over all but the last axis with PyTorch's defaults.

  The running statistics live in the 'batch_stats' collection; pass
  `use_running_average=not train` when calling. Under `jax.jit` with a
  batch-sharded input the statistics are global batch statistics (XLA
  reduces across devices), so no `axis_name` is needed. With
  `unbiased_variance` the running variance is updated with the unbiased
  batch variance, as PyTorch does (`UnbiasedVarianceBatchNorm`); else with
  the biased one (`nn.BatchNorm`).
  """
  module = UnbiasedVarianceBatchNorm if unbiased_variance else nn.BatchNorm
  return module(
      momentum=BATCH_NORM_MOMENTUM, epsilon=BATCH_NORM_EPSILON, dtype=dtype,
      param_dtype=jnp.float32,
      scale_init=_named(nn.initializers.ones_init(), ("norm",)),
      bias_init=_named(nn.initializers.zeros_init(), ("norm",)),
      name=name)


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
  """The exact GELU, x Phi(x) = x erfc(-x / sqrt 2) / 2, with its derivative written out.

  The same values as `nn.gelu(x, approximate=False)`. The gradient is
  Phi(x) + x phi(x), evaluated in float32 from the saved input in one
  elementwise pass; differentiating the erfc formula instead made the TPU
  compiler write a float32 copy of the hidden map in the forward pass and
  again in the backward pass of every Mix-FFN (`benchmarks/README.md`).
  """
  # The barrier keeps the producer (the Mix-FFN's depthwise convolution) from
  # absorbing -x / sqrt 2 and handing it to erfc's fusion in float32.
  return nn.gelu(jax.lax.optimization_barrier(x), approximate=False)


def _gelu_forward(x):
  return gelu(x), x


def _gelu_backward(x, grad):
  x32 = jax.lax.optimization_barrier(x).astype(jnp.float32)
  derivative = (0.5 * jax.lax.erfc(-x32 * np.sqrt(0.5))
                + x32 * jnp.exp(-0.5 * jnp.square(x32)) / np.sqrt(2 * np.pi))
  return ((grad.astype(jnp.float32) * derivative).astype(grad.dtype),)


gelu.defvjp(_gelu_forward, _gelu_backward)


def pointwise_conv_batch_norm(conv: nn.Module, norm: nn.BatchNorm, x: jax.Array,
                              train: bool) -> jax.Array:
  """norm(conv(x)) for a bias-free 1x1 `conv` and a `batch_norm`, without forming conv(x).

  y = x W is linear in x, so the BatchNorm's batch statistics of y follow
  from x's first and second moments: mean(y) = mean(x) W and
  E[y_c^2] = W_c^T E[x x^T] W_c (C_in x C_in, float32). The normalised map
  is then one 1x1 convolution with a bias, x (W s) + (beta - mean(y) s),
  s = scale / sqrt(var(y) + eps): C_in multiply-adds in float32, cast once,
  for inputs of up to `POINTWISE_FMA_CHANNELS` channels (an image). The same
  function as `norm(conv(x))` (the same statistics, normalisation and running
  statistics, with the same variables under the modules' names), but the
  statistics and their gradients never pass over the wide map y: the conv
  stems widen 3 input channels to 64 at the full 480 x 480, and every pass
  over that map is HBM traffic on a TPU (benchmarks/README.md, issue 29).

  Args:
    conv: `conv(features, 1, ..., use_bias=False)` ("conv" or "dot" form).
    norm: `batch_norm(...)` over conv's output channels.
    x: (..., C_in) input, C_in <= POINTWISE_FMA_CHANNELS.
    train: normalise with the batch statistics and update the running ones
      (not while initialising), else use the running ones.
  """
  if x.shape[-1] > POINTWISE_FMA_CHANNELS:
    raise ValueError(f"pointwise_conv_batch_norm: {x.shape[-1]} input channels; it computes "
                     f"up to {POINTWISE_FMA_CHANNELS} as multiply-adds")
  kernel = bound_params(conv, (0, 1, 1, x.shape[-1]), x.dtype)["kernel"][0, 0]
  norm(jnp.zeros((0, kernel.shape[-1]), x.dtype), use_running_average=True)
  params = nn.meta.unbox(norm.variables["params"])
  running = norm.variables["batch_stats"]
  if train:
    count = math.prod(x.shape[:-1])
    axes = tuple(range(x.ndim - 1))
    mean_x = jnp.mean(x, axis=axes, dtype=jnp.float32)
    second = jnp.einsum("...i,...j->ij", x, x, preferred_element_type=jnp.float32) / count
    mean = mean_x @ kernel
    var = jnp.maximum(0.0, jnp.einsum("ic,ij,jc->c", kernel, second, kernel) - jnp.square(mean))
    if not norm.is_initializing():
      new_mean, new_var = running_statistics(norm, running["mean"], running["var"], mean, var,
                                             x.shape)
      norm.put_variable("batch_stats", "mean", new_mean)
      norm.put_variable("batch_stats", "var", new_var)
  else:
    mean, var = running["mean"], running["var"]
  s = params["scale"] * jax.lax.rsqrt(var + norm.epsilon)
  kernel, bias = kernel * s, params["bias"] - mean * s
  # Multiply-adds in float32, which no remat policy keeps for the backward pass
  # (a matmul's output would be kept, at full resolution).
  with jax.named_scope(POINTWISE_FMA_SCOPE):
    y = sum(x[..., i:i + 1].astype(jnp.float32) * kernel[i] for i in range(x.shape[-1]))
  return (y + bias).astype(norm.dtype or x.dtype)


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch of a sample.

  Kept samples are scaled by 1 / (1 - rate) so the expectation is unchanged.
  Needs the 'dropout' rng in training mode.
  """

  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, mask_shape)
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


def separable_matmul(x: jax.Array, rows: np.ndarray, cols: np.ndarray) -> jax.Array:
  """(B, H, W, C) -> (B, h, w, C): x's rows mixed by rows (h, H), its columns by cols (w, W).

  A separable linear resampling (bilinear resize, area pooling) as two
  matmuls in x's dtype.
  """
  x = jnp.einsum("oh,bhwc->bowc", jnp.asarray(rows, x.dtype), x)
  return jnp.einsum("pw,bowc->bopc", jnp.asarray(cols, x.dtype), x)


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) linear-interpolation weights with half-pixel centres.

  PyTorch's `interpolate(mode="bilinear", align_corners=False)` along one
  axis: source coordinate (o + 0.5) in / out - 0.5, clamped at 0, blending
  its floor and the next pixel (clamped at the last one). No antialiasing.
  """
  source = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
  source = np.maximum(source, 0.0)
  low = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
  high = np.minimum(low + 1, in_size - 1)
  frac = source - low
  weights = np.zeros((out_size, in_size), np.float64)
  np.add.at(weights, (np.arange(out_size), low), 1.0 - frac)
  np.add.at(weights, (np.arange(out_size), high), frac)
  return weights.astype(np.float32)
