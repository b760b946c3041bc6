"""Model variants and the model config (one place for every model field).

`model_config(variant, **overrides)` returns an `ml_collections.ConfigDict`
with every field the model reads; `fgtbt_jax.models.build_model(config)`
builds the network from it. Example:

  config = model_config("paper", dtype="bfloat16", remat=True)
  model = build_model(config)
"""

from __future__ import annotations

import dataclasses

import ml_collections

from fgtbt_jax.models.decoder import FUSIONS
from fgtbt_jax.models.fgsa import FGSA_COMPAT, FREQUENCY_EXTRACTORS
from fgtbt_jax.models.heads import HEADS, HeadOptions
from fgtbt_jax.models.layers import POINTWISE_IMPLEMENTATIONS
from fgtbt_jax.models.compute import COMPUTE_FIELDS  # noqa: F401  (re-exported)
from fgtbt_jax.models.remat import REMAT_POLICIES
from fgtbt_jax.models.mit import (ATTENTION_IMPLEMENTATIONS, DEPTHWISE_IMPLEMENTATIONS,
                                  PATCH_EMBEDDINGS)

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
  """Per-stage shape of a four-stage MiT encoder."""

  dims: tuple[int, int, int, int]
  depths: tuple[int, int, int, int]
  num_heads: tuple[int, int, int, int] = (1, 2, 5, 8)
  sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)
  patch_sizes: tuple[int, int, int, int] = (7, 3, 3, 3)
  strides: tuple[int, int, int, int] = (4, 2, 2, 2)


_MIT_WIDE = (64, 128, 320, 512)

ENCODERS: dict[str, EncoderSpec] = {
    # The paper's encoder: mit_b4 widths with shortened depths.
    "paper": EncoderSpec(_MIT_WIDE, (3, 6, 18, 3)),
    "b0": EncoderSpec((32, 64, 160, 256), (2, 2, 2, 2)),
    "b1": EncoderSpec(_MIT_WIDE, (2, 2, 2, 2)),
    "b2": EncoderSpec(_MIT_WIDE, (3, 4, 6, 3)),
    "b3": EncoderSpec(_MIT_WIDE, (3, 4, 18, 3)),
    "b4": EncoderSpec(_MIT_WIDE, (3, 8, 27, 3)),
    "b5": EncoderSpec(_MIT_WIDE, (3, 6, 40, 3)),
    # CPU sizes: 16- and 32-wide attention heads, few blocks.
    "small": EncoderSpec((32, 64, 128, 256), (1, 1, 2, 1), num_heads=(1, 2, 4, 8)),
    "tiny": EncoderSpec((16, 32, 64, 128), (1, 1, 1, 1), num_heads=(1, 2, 4, 8)),
}

# Per-variant defaults beyond the encoder: input size and head widths. The
# paper's head (768 / 256 / 128) is the default for the paper and b0..b5;
# "small" and "tiny" are CPU-sized variants of the full architecture.
_PRESETS: dict[str, dict] = {
    "paper": dict(encoder="paper"),
    **{f"b{i}": dict(encoder=f"b{i}") for i in range(6)},
    "small": dict(encoder="small", input_size=128, decoder_dim=64, head_channels=32,
                  upsample_channels=16),
    "tiny": dict(encoder="tiny", input_size=64, decoder_dim=64, head_channels=32,
                 upsample_channels=16),
}

VARIANTS: tuple[str, ...] = tuple(_PRESETS)


def model_config(variant: str = "paper", **overrides) -> ml_collections.ConfigDict:
  """The model config of a named variant, with field overrides.

  Args:
    variant: "paper" (the FGTBT paper network), "b0".."b5" (standard MiT
      encoders with the paper's head), "small" (32..256-wide encoder with
      1/1/2/1 blocks, light head, 128 input) or "tiny" (16..128 wide, one
      block per stage, light head, 64 input: unit tests and CPU runs). See
      docs/model.md for their CPU speed.
    **overrides: any field below, e.g. `fgsa=False, dtype="bfloat16"`.

  Returns:
    ConfigDict with the fields
      variant: the preset name (informational).
      encoder: encoder shape, a key of ENCODERS.
      input_size: square input side in pixels (multiple of 32); used for
        cost counts and by the data pipeline (the model accepts any multiple
        of 32).
      input_downsample: f, the network runs on the crop area-averaged by f
        (1, the FGTBT network; SHT-M's small input: a 64 px network for a
        256 px crop is 4): heatmaps f times coarser; with `hallucination`
        DHLN hallucinates the face at the crop's size from the reduced
        input. input_size must divide by 32 f.
      patch_embed: "conv_stem" (paper) or "plain" (MiT; loads ImageNet weights).
      fgsa: FGSA branch on/off (off = the paper's "w/o FGSA" ablation).
      frequency_extractor: "fft" (paper), "srm" or "wavelet".
      frequency_sigma: FFT high-pass sigma at a 480 input (20); scaled by
        input side / 480 at other sizes.
      fgsa_reduction: r, prompt width divisor (4).
      fgsa_compat: "paper" (the paper's FGSA) or "authors" (the FGSA of the
        authors' released code, which their weights need: see
        `fgsa.FGSA_COMPAT` and docs/model.md; its outputs depend on the
        batch-mates, and it takes square inputs only).
      batch_norm_unbiased_variance: BatchNorm running variances are updated
        with the unbiased batch variance, as PyTorch does (False: the biased
        one, Flax's default, as this project has always trained).
      decoder_dim, head_channels, upsample_channels: head widths (768/256/128).
      decoder_fusion: "composed" (the head's fusion in its exact cheap form,
        57.8 G instead of 91.8 G multiply-adds at 480) or "concat" (the
        SegFormer form; same parameters, same outputs within rounding).
      num_points: output heatmaps (124 unified landmarks).
      head: the landmark head, a name of `heads.HEADS`: "heatmap" (the
        FGTBT head, default), "hih" (Heatmap in Heatmap decimal maps) or
        "recurrent" (coarse-to-fine refinement steps); docs/model.md.
      hih_decimal_size: d, cells per side of HIH's decimal maps (8, the HIH
        paper's best; at least 3 for the "hih_subpixel" decoder).
      hih_channels: width of HIH's decimal branch (64).
      recurrent_steps: K refinement steps of the recurrent head (2), one
        shared step module.
      recurrent_channels: width of a refinement step (32).
      recurrent_kernel: odd side of a step's wide convolution (7).
      hallucination: SHT's DHLN on the head (`hallucination.DualHallucination`):
        a face-hallucination stream fused with the landmark stream, trained
        with `loss.hallucination_l1_weight` / `hallucination_gradient_weight`
        (off: the FGTBT network).
      hallucination_channels: that stream's width (32).
      hallucination_blocks: its super-resolution blocks (4, SHT's per module).
      dtype: compute dtype "float32" or "bfloat16" (parameters stay float32).
      drop_path_rate: stochastic depth of the last block (0.1).
      head_dropout: dropout after the head's fusion (0.1).
      remat: recompute every Transformer block in the backward pass.
      remat_policy: what the train step keeps of the forward pass for the
        backward pass (`remat.REMAT_POLICIES`): "none" (everything), "dots"
        (matmul and convolution outputs; the elementwise work is
        recomputed), "dots_no_attention" ("dots" less the attention
        products), "dots_no_batch", "nothing", "segments" (each block,
        patch embedding, FGSA Refine and injection, and the decoder
        recomputed when the backward pass reaches it: the smallest compiled
        step), or "auto" (the default:
        "dots_no_attention" on GPUs and TPUs, "none" on CPU, by the devices of the mesh
        the step is compiled for; measured in benchmarks/README.md).
      attention_impl: "xla", "cudnn" (NVIDIA GPU, bfloat16) or "einsum".
      depthwise_impl: the Mix-FFN depthwise 3x3 convolution: "conv", "shifts"
        (nine shifted multiply-adds, the same function; 4-80x faster with its
        gradients on XLA:CPU) or "auto" (shifts on CPU, conv elsewhere, by
        the devices of the mesh the model is traced for).
      pointwise_impl: the 1x1 convolutions (decoder, heads, conv stems):
        "conv" (the default) or "dot" (a matmul over channels, the same
        function and parameters; `layers.POINTWISE_IMPLEMENTATIONS`).
      norm_epsilon: block and stage LayerNorm epsilon (1e-6).
      embed_norm_epsilon: patch-embedding / spatial-reduction LayerNorm
        epsilon (1e-5; set both to 1e-5 to match transformers' SegFormer).

  Raises:
    ValueError: unknown variant or invalid field value.
    KeyError: an override names no field.
  """
  if variant not in _PRESETS:
    raise ValueError(f"unknown model variant {variant!r}; expected one of {VARIANTS}")
  config = ml_collections.ConfigDict()
  config.variant = variant
  config.encoder = "paper"
  config.input_size = 480
  config.input_downsample = 1
  config.patch_embed = "conv_stem"
  config.fgsa = True
  config.frequency_extractor = "fft"
  config.frequency_sigma = 20.0
  config.fgsa_reduction = 4
  config.fgsa_compat = "paper"
  config.batch_norm_unbiased_variance = False
  config.decoder_dim = 768
  config.decoder_fusion = "composed"
  config.head_channels = 256
  config.upsample_channels = 128
  config.num_points = 124
  config.update(dataclasses.asdict(HeadOptions()))  # head ... hallucination_blocks
  config.dtype = "float32"
  config.drop_path_rate = 0.1
  config.head_dropout = 0.1
  config.remat = False
  config.remat_policy = "auto"
  config.attention_impl = "xla"
  config.depthwise_impl = "auto"
  config.pointwise_impl = "conv"
  config.norm_epsilon = 1e-6
  config.embed_norm_epsilon = 1e-5
  config.update(_PRESETS[variant])
  for key, value in overrides.items():
    if key not in config:
      raise KeyError(f"model_config: unknown field {key!r}; fields are {sorted(config.keys())}")
    config[key] = value
  validate_model_config(config)
  return config




def batch_dependent(config: ml_collections.ConfigDict) -> bool:
  """Whether the model's eval-mode outputs for a sample depend on its batch-mates.

  True for the authors' FGSA (`fgsa_compat="authors"`: its channel attention
  pools over the whole batch), where padding a batch changes the real
  samples' answers; such batches must run at their true size.
  """
  return bool(config.fgsa) and config.fgsa_compat == "authors"


def validate_model_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first field with an invalid value."""
  choices = {
      "encoder": tuple(ENCODERS),
      "patch_embed": PATCH_EMBEDDINGS,
      "frequency_extractor": FREQUENCY_EXTRACTORS,
      "fgsa_compat": FGSA_COMPAT,
      "decoder_fusion": FUSIONS,
      "dtype": DTYPES,
      "attention_impl": ATTENTION_IMPLEMENTATIONS,
      "depthwise_impl": DEPTHWISE_IMPLEMENTATIONS,
      "pointwise_impl": POINTWISE_IMPLEMENTATIONS,
      "head": tuple(HEADS),
      "remat_policy": REMAT_POLICIES,
  }
  for field, allowed in choices.items():
    if config[field] not in allowed:
      raise ValueError(f"model config: {field}={config[field]!r}; expected one of {allowed}")
  if config.variant not in VARIANTS:
    raise ValueError(f"model config: variant={config.variant!r}; expected one of {VARIANTS}")
  if config.encoder != _PRESETS[config.variant]["encoder"]:
    # The variant is a name; the fields make the network. A changed name alone
    # would train one network and record another.
    raise ValueError(
        f"model config: variant={config.variant!r} is the {_PRESETS[config.variant]['encoder']} "
        f"encoder, but encoder={config.encoder!r}; change the variant with its fields "
        "(models.model_config(variant), e.g. configs/ablations.py or a config file), or set "
        "encoder too")
  if config.input_size <= 0 or config.input_size % 32:
    raise ValueError(f"model config: input_size={config.input_size} must be a positive multiple of 32")
  factor = config.input_downsample
  if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
    raise ValueError(f"model config: input_downsample={factor!r} must be an integer >= 1")
  if config.input_size % (32 * factor):
    raise ValueError(f"model config: input_size={config.input_size} must be a multiple of 32 x "
                     f"input_downsample ({32 * factor}): the network runs at input_size / "
                     f"{factor}")
  spec = ENCODERS[config.encoder]
  for dim in spec.dims:
    if dim % config.fgsa_reduction:
      raise ValueError(
          f"model config: fgsa_reduction={config.fgsa_reduction} does not divide stage width {dim}")
  if config.frequency_sigma <= 0:
    raise ValueError(f"model config: frequency_sigma={config.frequency_sigma} must be > 0")
  for field in ("drop_path_rate", "head_dropout"):
    if not 0.0 <= config[field] < 1.0:
      raise ValueError(f"model config: {field}={config[field]} must be in [0, 1)")
  _validate_head(config)
  if not isinstance(config.hallucination, bool):
    raise ValueError(f"model config: hallucination={config.hallucination!r} must be True or False")
  if not isinstance(config.batch_norm_unbiased_variance, bool):
    raise ValueError(f"model config: batch_norm_unbiased_variance="
                     f"{config.batch_norm_unbiased_variance!r} must be True or False")


def _validate_head(config: ml_collections.ConfigDict) -> None:
  """The head fields: positive integer widths and counts, an odd wide kernel."""
  minimum = {"hih_decimal_size": 2, "hih_channels": 1, "recurrent_steps": 1,
             "recurrent_channels": 1, "recurrent_kernel": 1, "hallucination_channels": 1,
             "hallucination_blocks": 0}
  for field, low in minimum.items():
    value = config[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise ValueError(f"model config: {field}={value!r} must be an integer >= {low}")
  if config.recurrent_kernel % 2 == 0:
    raise ValueError(f"model config: recurrent_kernel={config.recurrent_kernel} must be odd "
                     "(a centred 'same' convolution)")
