"""Mix Transformer (SegFormer "MiT") building blocks (FGTBT paper section 3.1).

Tokens are (batch, height * width, channels) in row-major spatial order, so
`tokens.reshape(B, H, W, C)` is the feature map (channels last); no transposes
are needed between the two views.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fgtbt_jax.models import layers
from fgtbt_jax.models.compute import Compute
from fgtbt_jax.models.partitioning import target_platform

Dtype = Any

ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "einsum")
# How the Mix-FFN's depthwise 3x3 convolution is computed (`MixFFN`).
DEPTHWISE_IMPLEMENTATIONS = ("auto", "conv", "shifts")
PATCH_EMBEDDINGS = ("conv_stem", "plain")

# Name scope of the attention core (lets the MAC counter tell its
# activation-by-activation products from the linear layers).
ATTENTION_SCOPE = "attention_core"


def attention_core(query: jax.Array, key: jax.Array, value: jax.Array,
                   implementation: str) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v for (B, T, heads, d) queries and (B, S, heads, d) keys/values.

  Args:
    query, key, value: per-head projections.
    implementation: "xla" or "cudnn" use the fused `jax.nn.dot_product_attention`
      ("cudnn" needs an NVIDIA GPU and float16/bfloat16 inputs); "einsum" is
      the plain two-matmul form with a float32 softmax, kept as a reference.

  Returns:
    (B, T, heads, d) attention output in the query's dtype.
  """
  if implementation == "einsum":
    scale = query.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key,
                        preferred_element_type=jnp.float32) * scale
    weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, value)
  if implementation in ("xla", "cudnn"):
    return jax.nn.dot_product_attention(query, key, value, implementation=implementation)
  raise ValueError(
      f"unknown attention_impl {implementation!r}; expected one of {ATTENTION_IMPLEMENTATIONS}")


class OverlapPatchEmbed(nn.Module):
  """Overlapping patch embedding: feature map -> tokens at stride `stride`.

  "plain" (MiT): conv(k, s, padding k // 2) then LayerNorm.
  "conv_stem" (the FGTBT authors' variant):
  BN-ReLU-1x1conv(no bias)-BN-ReLU-conv(k, s)-BN-ReLU-1x1conv(no bias), then
  LayerNorm, with every hidden width equal to `features` (this choice
  reproduces the paper's parameter count, 47.3 M for the paper encoder).

  Attributes:
    features: output channels C.
    patch_size: k.
    stride: s.
    kind: "plain" or "conv_stem".
    norm_epsilon: epsilon of the final LayerNorm (1e-5 in MiT).
    axis: logical axis name of the output width ("embed"; "prompt" for the
      FGSA structure branch).
    batch_norm_unbiased_variance: conv-stem BatchNorms update their running
      variance with the unbiased batch variance (PyTorch).
    compute: how to compute (`compute.Compute`: dtype, the 1x1 convolutions).
  """

  features: int
  patch_size: int
  stride: int
  kind: str = "plain"
  norm_epsilon: float = 1e-5
  axis: str = "embed"
  batch_norm_unbiased_variance: bool = False
  compute: Compute = Compute()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, tuple[int, int]]:
    """Maps (B, H, W, C_in) to tokens (B, h * w, features) and the grid (h, w)."""
    c, k, s = self.features, self.patch_size, self.stride
    dtype, pointwise = self.compute.dtype, self.compute.pointwise
    if self.kind == "plain":
      x = layers.conv(c, k, self.axis, strides=s, padding=k // 2, dtype=dtype, name="proj")(x)
    elif self.kind == "conv_stem":
      def bn_relu(y, name):
        y = layers.batch_norm(dtype=dtype, unbiased_variance=self.batch_norm_unbiased_variance,
                              name=name)(y, use_running_average=not train)
        return nn.relu(y)
      x = bn_relu(x, "norm_in")
      conv_in = layers.conv(c, 1, self.axis, use_bias=False, dtype=dtype, pointwise=pointwise,
                            name="conv_in")
      if x.shape[-1] <= layers.POINTWISE_FMA_CHANNELS:
        # An image (stage 1's and FGSA Refine's stems): norm_mid(conv_in(x)) with
        # its statistics from the 3 channels' moments, so the 64-channel map at
        # full resolution is made once, normalised, and never kept for the
        # backward pass (stage 1's stem alone moved 2.7 GB of HBM per 8 images
        # on v5e, 1.6 GB so; benchmarks/README.md).
        x = nn.relu(layers.pointwise_conv_batch_norm(
            conv_in, layers.batch_norm(dtype=dtype,
                                       unbiased_variance=self.batch_norm_unbiased_variance,
                                       name="norm_mid"), x, train))
      else:
        x = bn_relu(conv_in(x), "norm_mid")
      x = layers.conv(c, k, self.axis, strides=s, padding=k // 2, dtype=dtype, name="proj")(x)
      x = bn_relu(x, "norm_out")
      x = layers.conv(c, 1, self.axis, use_bias=False, dtype=dtype, pointwise=pointwise,
                      name="conv_out")(x)
    else:
      raise ValueError(f"unknown patch_embed {self.kind!r}; expected one of {PATCH_EMBEDDINGS}")
    b, h, w, _ = x.shape
    tokens = x.reshape(b, h * w, c)
    tokens = layers.layer_norm(self.norm_epsilon, dtype=dtype, name="norm")(tokens)
    return tokens, (h, w)


class EfficientSelfAttention(nn.Module):
  """Multi-head self-attention with spatially reduced keys and values.

  Keys and values come from the token map reduced by a conv (kernel and
  stride `sr_ratio`) + LayerNorm when `sr_ratio > 1`, which divides the
  attention cost by sr_ratio^2. k and v share one fused projection kv
  (k first), as in the MiT reference code.

  Attributes:
    dim: channels C.
    num_heads: attention heads (C must divide).
    sr_ratio: spatial reduction ratio.
    grid: (h, w) of the tokens.
    sr_norm_epsilon: epsilon of the reduction LayerNorm (1e-5 in MiT).
    compute: how to compute (`compute.Compute`: dtype, the attention core of
      `attention_core`).
  """

  dim: int
  num_heads: int
  sr_ratio: int
  grid: tuple[int, int]
  sr_norm_epsilon: float = 1e-5
  compute: Compute = Compute()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, c = x.shape
    if c % self.num_heads:
      raise ValueError(f"attention: {c} channels do not split into {self.num_heads} heads")
    head_dim = c // self.num_heads
    dtype = self.compute.dtype
    q = layers.dense(c, "embed", "qkv", dtype=dtype, name="q")(x)
    source = x
    if self.sr_ratio > 1:
      h, w = self.grid
      m = x.reshape(b, h, w, c)
      m = layers.conv(c, self.sr_ratio, "embed", strides=self.sr_ratio, padding="VALID",
                      dtype=dtype, name="sr")(m)
      source = m.reshape(b, -1, c)
      source = layers.layer_norm(self.sr_norm_epsilon, dtype=dtype, name="sr_norm")(source)
    kv = layers.dense(2 * c, "embed", "qkv", dtype=dtype, name="kv")(source)
    k, v = kv[..., :c], kv[..., c:]
    heads = lambda t: t.reshape(b, t.shape[1], self.num_heads, head_dim)
    with jax.named_scope(ATTENTION_SCOPE):
      out = attention_core(heads(q), heads(k), heads(v), self.compute.attention)
    out = out.reshape(b, n, c)
    return layers.dense(c, "qkv", "embed", dtype=dtype, name="proj")(out)


def resolve_depthwise_impl(implementation: str, platform: str | None = None) -> str:
  """"auto" -> "shifts" on CPU (XLA:CPU's grouped convolution, and its kernel
  gradient above all, is many times slower there), else "conv".

  `platform` defaults to that of the devices the model is traced for
  (`partitioning.target_platform()`: the mesh in context, else JAX's default
  backend), so a CPU host compiling for a TPU topology gets "conv".
  """
  if implementation not in DEPTHWISE_IMPLEMENTATIONS:
    raise ValueError(f"unknown depthwise_impl {implementation!r}; expected one of "
                     f"{DEPTHWISE_IMPLEMENTATIONS}")
  if implementation == "auto":
    return "shifts" if (platform or target_platform()) == "cpu" else "conv"
  return implementation


def _shifted_sum(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """sum over the 3x3 taps of pad(x)[shifted] * kernel[tap]: a depthwise correlation, padding 1."""
  h, w = x.shape[1:3]
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = padded[:, 0:h, 0:w, :] * kernel[0, 0, 0]
  for dy in range(3):
    for dx in range(3):
      if dy or dx:
        out = out + padded[:, dy:dy + h, dx:dx + w, :] * kernel[dy, dx, 0]
  return out


@jax.custom_vjp
def depthwise_conv3x3_shifts(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """A 3x3 depthwise convolution (padding 1) of (B, H, W, C) as nine shifted multiply-adds.

  `kernel` is the (3, 3, 1, C) kernel of the grouped convolution and `bias`
  (C,): the same function as `conv_general_dilated` with
  `feature_group_count=C`, summed in another order. Its gradient is written
  out (the input's is the same sum with the flipped kernel, the kernel's
  nine multiply-reductions), so the backward pass holds one padded copy of
  the input rather than XLA's nine shifted ones.
  """
  return _shifted_sum(x, kernel) + bias


def _shifts_forward(x, kernel, bias):
  return depthwise_conv3x3_shifts(x, kernel, bias), (x, kernel)


def _shifts_backward(residuals, g):
  x, kernel = residuals
  b, h, w, c = x.shape
  dx = _shifted_sum(g, kernel[::-1, ::-1])
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  offsets = jnp.asarray([(dy, dx_) for dy in range(3) for dx_ in range(3)], jnp.int32)
  # One tap after another (lax.map): XLA:CPU would otherwise hold all nine
  # products at once, and it runs faster so too.
  tap = lambda o: jnp.sum(jax.lax.dynamic_slice(padded, (0, o[0], o[1], 0), (b, h, w, c)) * g,
                          axis=(0, 1, 2), dtype=jnp.float32)
  dkernel = jax.lax.map(tap, offsets).reshape(kernel.shape).astype(kernel.dtype)
  return dx.astype(x.dtype), dkernel, jnp.sum(g, axis=(0, 1, 2)).astype(kernel.dtype)


depthwise_conv3x3_shifts.defvjp(_shifts_forward, _shifts_backward)


class MixFFN(nn.Module):
  """Linear(C, rC) -> depthwise 3x3 conv (bias) -> GELU (exact) -> Linear(rC, C).

  `compute.depthwise`: "conv" (a grouped convolution), "shifts" (nine shifted
  multiply-adds, `depthwise_conv3x3_shifts`: the same parameters and
  function, much faster on XLA:CPU) or "auto" (shifts on CPU, else conv).
  """

  dim: int
  grid: tuple[int, int]
  ratio: int = 4
  compute: Compute = Compute()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, _ = x.shape
    hidden = self.ratio * self.dim
    dtype = self.compute.dtype
    x = layers.dense(hidden, "embed", "mlp", dtype=dtype, name="fc1")(x)
    m = x.reshape(b, *self.grid, hidden)
    # Its kernel's channels are "depthwise", never split: split over "fsdp" like
    # the "mlp" widths, the TPU compiler split the convolution by channel and
    # all-gathered the whole global batch's map into every chip (464 GB per chip
    # and step on a 4 x 4 mesh; benchmarks/README.md).
    dwconv = layers.conv(hidden, 3, "depthwise", padding=1, groups=hidden, dtype=dtype,
                         name="dwconv")
    if resolve_depthwise_impl(self.compute.depthwise) == "shifts":
      params = layers.bound_params(dwconv, (0, 1, 1, hidden), dtype)
      m = depthwise_conv3x3_shifts(m.astype(dtype), params["kernel"].astype(dtype),
                                   params["bias"].astype(dtype))
    else:
      m = dwconv(m)
    x = layers.gelu(m.reshape(b, n, hidden))
    return layers.dense(self.dim, "mlp", "embed", dtype=dtype, name="fc2")(x)


class Block(nn.Module):
  """x = x + DropPath(Attn(LN(x))); x = x + DropPath(MixFFN(LN(x)))."""

  dim: int
  num_heads: int
  sr_ratio: int
  grid: tuple[int, int]
  drop_path: float = 0.0
  norm_epsilon: float = 1e-6
  sr_norm_epsilon: float = 1e-5
  compute: Compute = Compute()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    dtype = self.compute.dtype
    y = layers.layer_norm(self.norm_epsilon, dtype=dtype, name="norm1")(x)
    y = EfficientSelfAttention(
        self.dim, self.num_heads, self.sr_ratio, self.grid,
        sr_norm_epsilon=self.sr_norm_epsilon, compute=self.compute, name="attention")(y)
    x = x + layers.DropPath(self.drop_path)(y, train)
    y = layers.layer_norm(self.norm_epsilon, dtype=dtype, name="norm2")(x)
    y = MixFFN(self.dim, self.grid, compute=self.compute, name="mlp")(y)
    x = x + layers.DropPath(self.drop_path)(y, train)
    return nn.with_logical_constraint(x, ("batch", "tokens", "embed"))
