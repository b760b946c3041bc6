"""The train step's rematerialisation policies: same gradients, fewer saved bytes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

from fgtbt_jax import landmarks
from fgtbt_jax import losses
from fgtbt_jax import models
from fgtbt_jax import sharding
from fgtbt_jax import train
from fgtbt_jax.models import decoder as decoder_lib
from fgtbt_jax.models import encoder as encoder_lib
from fgtbt_jax.models.compute import Compute
from fgtbt_jax.models import mit
from fgtbt_jax.models import partitioning
from fgtbt_jax.models import remat

SIZE = 64


def _tiny(policy="auto"):
  config = models.model_config("tiny", input_size=SIZE, remat_policy=policy)
  model = models.build_model(config)
  variables = models.random_variables(models.abstract_variables(model, SIZE))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((2, SIZE, SIZE, 3)), jnp.float32)
  points = jnp.asarray((0.1 + 0.8 * landmarks.mean_face()[None].repeat(2, 0)) * SIZE,
                       jnp.float32)
  mask = jnp.asarray(landmarks.PROTOCOL_MASKS[[0, 1]])
  target = losses.render_targets(points, mask, SIZE // 2, SIZE // 2, 1.5, 2)
  return model, variables, images, target


def _loss_fn(model, variables, images, target, policy):
  """The train step's forward pass under `policy` (`train.model_forward`), then the loss."""
  forward = train.model_forward(model, variables["batch_stats"], jax.random.key(1), policy)

  def loss(params):
    outputs, updates = forward(params, images)
    return losses.sample_landmark_losses(outputs["heatmaps"], target).mean(), updates

  return loss


def _saved_bytes(loss, params):
  """Bytes of what `jax.vjp` keeps for the backward pass, parameters left out."""
  saved = jax.eval_shape(lambda p: jax.vjp(lambda q: loss(q)[0], p)[1], params)
  param_shapes = {(x.shape, x.dtype) for x in jax.tree.leaves(params)}
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(saved)
             if (x.shape, x.dtype) not in param_shapes)


def test_unknown_policy_is_refused_naming_the_field():
  with pytest.raises(ValueError, match="remat_policy='some'"):
    models.model_config("tiny", remat_policy="some")
  with pytest.raises(ValueError, match="remat_policy"):
    models.rematerialize(lambda x: x, "everything")


def test_auto_policy_is_none_on_cpu_and_dots_no_attention_on_accelerators():
  assert models.resolve_remat_policy("auto", "cpu") == "none"
  assert models.resolve_remat_policy("auto", "gpu") == "dots_no_attention"
  assert models.resolve_remat_policy("auto", "tpu") == "dots_no_attention"
  assert models.resolve_remat_policy("dots_no_batch", "cpu") == "dots_no_batch"
  assert models.model_config("paper").remat_policy == "auto"


def test_auto_resolves_for_the_devices_of_the_mesh_in_context():
  # The platform of the mesh the program is traced for, not the tracing host's
  # backend: a CPU host compiling for a TPU mesh gets the accelerator forms.
  tpu = AbstractMesh((2, 2), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 2,
                     abstract_device=AbstractDevice("TPU v5 lite", 1, "tpu"))

  def choices():
    return (partitioning.target_platform(), models.resolve_remat_policy("auto"),
            mit.resolve_depthwise_impl("auto"))

  def traced_choices():  # as the train step resolves them: while jit traces it
    seen = []
    jax.eval_shape(lambda x: seen.append(choices()) or x, jax.ShapeDtypeStruct((), jnp.float32))
    return seen[0]

  with jax.sharding.use_abstract_mesh(tpu):
    assert choices() == traced_choices() == ("tpu", "dots_no_attention", "conv")
  with jax.set_mesh(sharding.single_device_mesh(jax.devices()[0])):
    assert choices() == traced_choices() == ("cpu", "none", "shifts")
  # No mesh: JAX's default backend (this suite's CPU); a named platform wins.
  assert choices() == ("cpu", "none", "shifts") and jax.default_backend() == "cpu"
  assert models.resolve_remat_policy("auto", "tpu") == "dots_no_attention"
  assert mit.resolve_depthwise_impl("auto", "gpu") == "conv"


def test_policies_keep_fewer_bytes_for_the_backward_pass():
  model, variables, images, target = _tiny()
  params = variables["params"]
  saved = {policy: _saved_bytes(_loss_fn(_tiny(policy)[0], variables, images, target, policy),
                                params)
           for policy in ("none", "dots", "dots_no_attention", "dots_no_batch", "nothing",
                          "segments")}
  # The elementwise work (norms, GELU, softmax, dropout) is most of it.
  assert saved["dots"] < 0.6 * saved["none"], saved
  # Less the attention logits (batched products); the convolutions still kept.
  assert saved["dots_no_batch"] < saved["dots_no_attention"] < saved["dots"], saved
  assert saved["nothing"] < saved["dots_no_batch"], saved
  # Segment inputs (each block's, patch embedding's and the decoder's) and
  # the values outside segments (FGSA branch, loss inputs).
  assert saved["segments"] < 0.5 * saved["none"], saved


@pytest.mark.parametrize("policy", ["dots", "dots_no_attention", "segments"])  # "nothing" alike.
def test_policy_gives_the_same_loss_gradients_and_batch_statistics(policy):
  model, variables, images, target = _tiny("none")
  params = variables["params"]
  reference = jax.jit(jax.value_and_grad(
      _loss_fn(model, variables, images, target, "none"), has_aux=True))
  # "segments" is part of the model; the same parameter tree either way.
  remat_model = _tiny(policy)[0]
  assert jax.tree.structure(models.abstract_variables(remat_model, SIZE)) == \
      jax.tree.structure(models.abstract_variables(model, SIZE))
  rematerialized = jax.jit(jax.value_and_grad(
      _loss_fn(remat_model, variables, images, target, policy), has_aux=True))
  (loss_a, stats_a), grads_a = reference(params)
  (loss_b, stats_b), grads_b = rematerialized(params)
  np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
  for a, b in zip(jax.tree.leaves((grads_a, stats_a)), jax.tree.leaves((grads_b, stats_b))):
    # Recomputed values are fused differently: float32 rounding (gradients
    # here are 1e-3..1; one that is zero in exact arithmetic, a bias before a
    # BatchNorm, is rounding noise of ~1e-6 either way).
    np.testing.assert_allclose(b, a, rtol=5e-3, atol=5e-5)
  # Not trivially equal: the gradients are there (dropout was on in both).
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads_a)) > 1e-2


def test_loss_terms_are_recomputed_not_kept():
  """Only the prediction and target of the per-pixel loss stay for the backward pass."""
  rng = np.random.default_rng(0)
  pred = jnp.asarray(rng.random((2, 16, 16, 5)), jnp.float32)
  target = jnp.asarray(rng.random((2, 16, 16, 5)), jnp.float32)
  saved = jax.eval_shape(
      lambda p: jax.vjp(lambda q: losses.sample_landmark_losses(q, target).sum(), p)[1], pred)
  per_pixel = [x for x in jax.tree.leaves(saved) if x.shape == pred.shape]
  assert len(per_pixel) <= 2, [x.shape for x in jax.tree.leaves(saved)]
  # Gradient unchanged: against the same terms written out without recomputation.
  direct = lambda q: (losses.adaptive_wing(q, target) * losses.weight_map(target)).mean(
      axis=(1, 2)).sum()
  np.testing.assert_allclose(
      jax.grad(lambda q: losses.sample_landmark_losses(q, target).sum())(pred),
      jax.grad(direct)(pred), rtol=1e-6)



def test_head_loss_keeps_neither_target_nor_a_float32_copy_of_bfloat16_maps():
  """The train step's loss keeps only the maps themselves, in their own dtype."""
  rng = np.random.default_rng(0)
  config = losses.LossConfig(sigma=1.5)
  params, state = losses.init_balancer(config)
  mask = landmarks.PROTOCOL_MASKS[np.array([0, 1, 2, 3])]
  points = jnp.asarray(np.where(mask[..., None], rng.uniform(2, 30, (4, 124, 2)), np.nan),
                       jnp.float32)
  dataset_id = jnp.arange(4)
  target = losses.render_targets(points, mask, 16, 16, 1.5, 2.0)
  maps = (target + 0.1 * jnp.asarray(rng.standard_normal(target.shape))).astype(jnp.bfloat16)

  def total(q):
    return losses.head_loss(config, {"heatmaps": q}, points, mask, dataset_id, 2.0,
                            params, state)[0]

  saved = jax.eval_shape(lambda q: jax.vjp(total, q)[1], maps)
  per_pixel = [(x.dtype, x.shape) for x in jax.tree.leaves(saved) if x.shape == maps.shape]
  assert per_pixel == [(jnp.bfloat16, maps.shape)], per_pixel
  # Same value and gradient as the loss on the target rendered outside.
  explicit = lambda q: losses.fmb_loss(config, q, target, mask, dataset_id, params, state)[0]
  np.testing.assert_allclose(total(maps), explicit(maps), rtol=1e-6)
  grad, grad_explicit = jax.grad(total)(maps), jax.grad(explicit)(maps)
  assert grad.dtype == jnp.bfloat16
  np.testing.assert_allclose(grad.astype(np.float32), grad_explicit.astype(np.float32),
                             rtol=1e-2, atol=1e-9)
  assert float(jnp.abs(grad.astype(jnp.float32)).max()) > 0


def _encoder(recompute: bool, fgsa: bool = False, depths=(2, 2, 4, 2)):
  return encoder_lib.MixTransformer(
      dims=(16, 32, 48, 64), depths=depths, num_heads=(1, 2, 2, 4),
      sr_ratios=(8, 4, 2, 1), patch_embed="conv_stem", drop_path_rate=0.2,
      fgsa=fgsa,
      compute=Compute(remat_blocks=recompute, remat_segments=recompute))


def _structure(encoder, images):
  """The high-frequency image FGSA takes (any image of that shape will do here)."""
  return jnp.flip(images, axis=1) if encoder.fgsa else None


def _encoder_loss(encoder):
  def loss(params, batch_stats, images):
    outputs, updates = encoder.apply({"params": params, "batch_stats": batch_stats}, images,
                                     _structure(encoder, images), train=True,
                                     rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"])
    return sum(jnp.sum(o ** 2) for o in outputs), updates
  return loss


def test_recomputed_blocks_and_embeddings_give_the_same_gradients_and_statistics():
  """Dropout masks, BatchNorm updates and grid sizes survive the recomputation.

  Every kind of segment is here: blocks, patch embeddings, stage-end norms,
  FGSA's Refine and its injections (the stage's shared channel attention and
  BatchNorm, updated once per block: two blocks in stages 1 and 3). The
  authors' FGSA differs only inside the injection, the same segment.
  """
  encoders = {recompute: _encoder(recompute, fgsa=True, depths=(2, 1, 2, 1))
              for recompute in (False, True)}
  images = jnp.asarray(np.random.default_rng(0).standard_normal((2, 64, 64, 3)), jnp.float32)
  abstract = {recompute: jax.eval_shape(
      lambda x: e.init(jax.random.key(0), x, _structure(e, x)), images)
      for recompute, e in encoders.items()}
  assert jax.tree.structure(abstract[False]) == jax.tree.structure(abstract[True])
  variables = models.random_variables(abstract[False])  # compiling the initialisers takes longer
  grads = {}
  for recompute, encoder in encoders.items():
    step = jax.jit(jax.value_and_grad(_encoder_loss(encoder), has_aux=True))
    grads[recompute] = step(variables["params"], variables["batch_stats"], images)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads[False][1]))
  # Dropout (drop path 0.2) and BatchNorm were on; gradients are not all zero.
  assert scale > 1e-2
  refine = {False: [], True: []}
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads[False]),
                          jax.tree.leaves(grads[True])):
    if "refine" in jax.tree_util.keystr(path):
      # FGSA's Refine: on some CPUs (an AMD EPYC, 2026-12-06) XLA:CPU's
      # gradient of this branch differs by up to 20% of a leaf's largest
      # value between any two programs that recompute it, jax.checkpoint's
      # own against no recomputation included (the forward values and every
      # other gradient agree to 1e-4; on the Intel machines of earlier
      # sessions Refine did too): compared by direction below.
      refine[False].append(np.ravel(a))
      refine[True].append(np.ravel(b))
      continue
    # Fused differently: float32 rounding, relative to the largest gradient (a
    # bias before a BatchNorm has a zero gradient in exact arithmetic).
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6 * scale,
                               err_msg=jax.tree_util.keystr(path))
  a, b = np.concatenate(refine[False]), np.concatenate(refine[True])
  cosine = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
  assert cosine > 0.99 and 0.9 < np.linalg.norm(b) / np.linalg.norm(a) < 1.1, cosine


def test_xla_cpu_keeps_only_segment_inputs_with_recompute_in_backward():
  """XLA's memory analysis: the recomputation really lowers the compiled step's peak.

  With `jax.checkpoint` XLA:CPU ran every block's recomputation at the start
  of the backward pass (its peak rose); tying each recomputation to its
  cotangent leaves one segment's values live at a time.
  """
  images = jax.ShapeDtypeStruct((4, 128, 128, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: _encoder(False).init(jax.random.key(0), x), images)
  temp = {}
  for recompute in (False, True):
    grad = jax.grad(_encoder_loss(_encoder(recompute)), has_aux=True)
    compiled = jax.jit(grad).lower(variables["params"], variables["batch_stats"], images).compile()
    temp[recompute] = compiled.memory_analysis().temp_size_in_bytes
  assert temp[True] < 0.5 * temp[False], temp


def test_recompute_in_backward_passes_python_outputs_and_static_arguments():
  calls = []

  def fun(x, scale, w):
    calls.append(scale)
    return {"y": jnp.sin(x * w) * scale, "grid": (3, 4)}

  wrapped = models.recompute_in_backward(fun, static_argnums=(1,))
  x, w = jnp.linspace(0.0, 1.0, 5), jnp.float32(2.0)
  out = wrapped(x, 3.0, w)
  assert out["grid"] == (3, 4) and calls == [3.0]
  got = jax.grad(lambda x, w: wrapped(x, 3.0, w)["y"].sum(), argnums=(0, 1))(x, w)
  want = jax.grad(lambda x, w: fun(x, 3.0, w)["y"].sum(), argnums=(0, 1))(x, w)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-6)


@pytest.mark.parametrize("policy", ["dots", "dots_no_attention", "dots_no_batch"])
def test_decoder_keeps_its_fused_map_not_the_four_resized_terms(policy):
  """The decoder's fused map is a sum of four resized matmul outputs (the composed
  fusion); the matmul-keeping policies keep the sum by name, so none of its terms."""
  from fgtbt_jax.models import decoder as decoder_lib
  head = decoder_lib.DecoderHead(decoder_dim=24, head_channels=8, upsample_channels=8,
                                 num_points=5, compute=Compute(dtype=jnp.float32))
  rng = np.random.default_rng(0)
  features = [jnp.asarray(rng.standard_normal((2, 16 >> i, 16 >> i, c)), jnp.float32)
              for i, c in enumerate((4, 8, 12, 16))]
  variables = head.init(jax.random.key(0), features, train=False)

  def forward(p):
    out, _ = head.apply({**variables, "params": p}, features, train=True,
                        rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"])
    return out["heatmaps"]

  def loss(params, kept_policy):
    rematerialized = (remat.rematerialize(forward, policy) if kept_policy is None
                      else jax.checkpoint(forward, policy=kept_policy))
    return jnp.sum(jnp.square(rematerialized(params)))

  fused_size = 2 * 16 * 16 * 24
  kept = lambda p: [x for x in jax.tree.leaves(jax.eval_shape(
      lambda q: jax.vjp(lambda r: loss(r, p), q)[1], variables["params"]))
      if x.size == fused_size]
  assert len(kept(None)) == 1
  # Without the name, the four terms (stage 1's matmul and three resizes) were kept.
  unnamed = {"dots": jax.checkpoint_policies.dots_saveable,
             "dots_no_attention": remat._dots_no_attention,
             "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[policy]
  assert len(kept(unnamed)) == 4
  # The same gradients either way.
  np.testing.assert_allclose(
      np.concatenate([np.ravel(g) for g in jax.tree.leaves(jax.grad(loss)(
          variables["params"], None))]),
      np.concatenate([np.ravel(g) for g in jax.tree.leaves(jax.grad(loss)(
          variables["params"], unnamed))]), rtol=1e-5, atol=1e-6)
