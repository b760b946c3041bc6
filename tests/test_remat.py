"""The train step's rematerialisation policies: same gradients, fewer saved bytes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgtbt_jax import landmarks
from fgtbt_jax import losses
from fgtbt_jax import models
from fgtbt_jax import train
from tests.model_helpers import numpy_variables

SIZE = 64


def _tiny():
  config = models.model_config("tiny", input_size=SIZE)
  model = models.build_model(config)
  variables = numpy_variables(models.abstract_variables(model, SIZE))
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


def test_auto_policy_is_none_on_cpu_and_dots_on_accelerators():
  assert models.resolve_remat_policy("auto", "cpu") == "none"
  assert models.resolve_remat_policy("auto", "gpu") == "dots"
  assert models.resolve_remat_policy("auto", "tpu") == "dots"
  assert models.resolve_remat_policy("dots_no_batch", "cpu") == "dots_no_batch"
  assert models.model_config("paper").remat_policy == "auto"


def test_policies_keep_fewer_bytes_for_the_backward_pass():
  model, variables, images, target = _tiny()
  params = variables["params"]
  saved = {policy: _saved_bytes(_loss_fn(model, variables, images, target, policy), params)
           for policy in ("none", "dots", "dots_no_batch", "nothing")}
  # The elementwise work (norms, GELU, softmax, dropout) is most of it.
  assert saved["dots"] < 0.6 * saved["none"], saved
  assert saved["dots_no_batch"] < saved["dots"], saved
  assert saved["nothing"] < saved["dots_no_batch"], saved


@pytest.mark.parametrize("policy", ["dots"])  # The accelerators' default; "nothing" alike.
def test_policy_gives_the_same_loss_gradients_and_batch_statistics(policy):
  model, variables, images, target = _tiny()
  params = variables["params"]
  reference = jax.jit(jax.value_and_grad(
      _loss_fn(model, variables, images, target, "none"), has_aux=True))
  rematerialized = jax.jit(jax.value_and_grad(
      _loss_fn(model, variables, images, target, policy), has_aux=True))
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
