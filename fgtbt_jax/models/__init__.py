"""FGTBT network: MiT encoder, FGSA, heatmap decoder, config, sharding names.

Public API:
  model_config(variant="paper", **overrides) -> ConfigDict
  compute_options(config) -> Compute: how the network is computed (dtype,
    recomputation, attention / depthwise / 1x1 / fusion forms), one frozen
    object every module takes as `compute`
  build_model(config) -> FGTBT;  build_encoder(config) -> MixTransformer
  normalize_images(images) -> ImageNet-normalised float32 images
  heads: the landmark heads (`heads.HEADS`, `model.head`) and their decoding
  hallucination: SHT's DHLN stream (`model.hallucination`) and the
    low-resolution inputs of its training mode
  LOGICAL_AXIS_NAMES, logical_axis_rules(mode), variable_shardings(...)
  count_macs(config, input_size=None) -> multiply-adds of the forward pass
  rematerialize(fn, policy): what the train step keeps for the backward pass
"""

from fgtbt_jax.models import fptn, hallucination, heads
from fgtbt_jax.models.compute import Compute, compute_options
from fgtbt_jax.models.config import (COMPUTE_FIELDS, ENCODERS, VARIANTS, batch_dependent,
                                     model_config, validate_model_config)
from fgtbt_jax.models.fgtbt import (
    FGTBT, IMAGENET_MEAN, IMAGENET_STD, abstract_variables, build_encoder, build_model,
    denormalize_images, normalize_images, parameter_count, random_variables)
from fgtbt_jax.models.partitioning import LOGICAL_AXIS_NAMES, logical_axis_rules, variable_shardings
from fgtbt_jax.models.cost import count_macs
from fgtbt_jax.models.remat import (REMAT_POLICIES, recompute_in_backward, rematerialize,
                                    resolve_remat_policy)

__all__ = [
    "fptn", "hallucination", "heads", "Compute", "compute_options", "COMPUTE_FIELDS", "ENCODERS", "VARIANTS", "batch_dependent", "model_config",
    "validate_model_config",
    "FGTBT", "IMAGENET_MEAN", "IMAGENET_STD", "abstract_variables", "build_encoder",
    "build_model", "denormalize_images", "normalize_images", "parameter_count", "random_variables",
    "LOGICAL_AXIS_NAMES", "logical_axis_rules", "variable_shardings", "count_macs",
    "REMAT_POLICIES", "recompute_in_backward", "rematerialize", "resolve_remat_policy",
]
