"""FPTN (issue 33): SHT's pose-transfer generator, discriminators and losses."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fgtbt_jax import models
from fgtbt_jax.models import fptn
from fgtbt_jax.models import partitioning
from fgtbt_jax.models.compute import Compute

B, H, W, K, C = 2, 16, 16, 5, 8


def _inputs(seed: int = 0):
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(B, H, W, 3)).astype(np.float32)
  h_con = rng.uniform(size=(B, H, W, K)).astype(np.float32)
  h_tar = rng.uniform(size=(B, H, W, K)).astype(np.float32)
  target = rng.normal(size=(B, H, W, 3)).astype(np.float32)
  return image, h_con, h_tar, target


@pytest.fixture(scope="module")
def generator_and_variables():
  generator = fptn.PoseTransferGenerator(channels=C, blocks=2, downsamples=2)
  image, h_con, h_tar, _ = _inputs()
  variables = jax.jit(generator.init, static_argnames="train")(
      jax.random.key(0), image, h_con, h_tar, train=False)
  return generator, nn.meta.unbox(variables)


def _nll(x):  # -log sigmoid(x), stable, in float64
  x = np.asarray(x, np.float64)
  return np.logaddexp(0.0, -x)


def test_generator_shapes_dtypes_and_batch_stats(generator_and_variables):
  generator, variables = generator_and_variables
  image, h_con, h_tar, _ = _inputs()
  assert set(variables) == {"params", "batch_stats"}
  apply = jax.jit(generator.apply, static_argnames=("train", "mutable"))
  out = apply(variables, image, h_con, h_tar, train=False)
  assert out.shape == (B, H, W, 3) and out.dtype == jnp.float32
  assert np.isfinite(np.asarray(out)).all()
  out, updates = apply(variables, image, h_con, h_tar, train=True, mutable=("batch_stats",))
  assert out.shape == (B, H, W, 3) and out.dtype == jnp.float32
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), variables["batch_stats"],
                         updates["batch_stats"])
  assert all(jax.tree.leaves(changed))
  # The last block computes no pose update; the others do.
  assert "pose" in variables["params"]["block_0"]
  assert "pose" not in variables["params"]["block_1"]


def test_generator_in_bfloat16_returns_float32():
  generator = fptn.PoseTransferGenerator(channels=C, blocks=1, downsamples=1,
                                         compute=Compute(dtype=jnp.bfloat16))
  image, h_con, h_tar, _ = _inputs()
  variables = jax.eval_shape(functools.partial(generator.init, train=False),
                             jax.random.key(1), image, h_con, h_tar)
  for train in (False, True):
    apply = functools.partial(generator.apply, train=train, mutable=["batch_stats"])
    out, _ = jax.eval_shape(apply, variables, image, h_con, h_tar)
    assert out.shape == (B, H, W, 3) and out.dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.meta.unbox(variables["params"])))


def test_generator_rejects_mismatched_inputs(generator_and_variables):
  generator, variables = generator_and_variables
  image, h_con, h_tar, _ = _inputs()
  with pytest.raises(ValueError, match="differ in shape"):
    generator.apply(variables, image, h_con, h_tar[..., :3], train=False)
  with pytest.raises(ValueError, match="spatial size"):
    generator.apply(variables, image, h_con[:, :8, :8], h_tar[:, :8, :8], train=False)
  odd = fptn.PoseTransferGenerator(channels=C, blocks=1, downsamples=2)
  with pytest.raises(ValueError, match="multiple of"):
    odd.init(jax.random.key(0), image[:, :14, :14], h_con[:, :14, :14], h_tar[:, :14, :14],
             train=False)


def test_generator_depends_on_the_target_pose(generator_and_variables):
  generator, variables = generator_and_variables
  image, h_con, h_tar, _ = _inputs()
  apply = jax.jit(lambda t: generator.apply(variables, image, h_con, t, train=False))
  out = np.asarray(apply(h_tar))
  moved = np.asarray(apply(np.roll(h_tar, 4, axis=1)))
  assert np.abs(out - moved).mean() > 1e-3 * np.abs(out).mean()
  np.testing.assert_array_equal(np.asarray(apply(h_tar)), out)  # deterministic


def test_generator_gradient_reaches_every_parameter(generator_and_variables):
  generator, variables = generator_and_variables
  image, h_con, h_tar, target = _inputs()

  def loss(params):
    out, _ = generator.apply({**variables, "params": params}, image, h_con, h_tar, train=True,
                             mutable=["batch_stats"])
    return fptn.transfer_l1(out, target)

  grads = jax.jit(jax.grad(loss))(variables["params"])
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  assert len(flat) > 20
  zero = [jax.tree_util.keystr(path) for path, g in flat if not np.any(np.asarray(g))]
  assert not zero, zero
  assert all(np.isfinite(np.asarray(g)).all() for _, g in flat)


def test_discriminator_shapes_and_independence_of_the_batch():
  layers, expected = 2, 4
  image, _, h_tar, target = _inputs()
  d_a, d_s = (fptn.PatchDiscriminator(channels=C, layers=layers) for _ in range(2))
  a_in, s_in = fptn.discriminator_inputs(image, h_tar, target)
  assert a_in.shape == (B, H, W, 6) and s_in.shape == (B, H, W, K + 3)
  for d, x in ((d_a, a_in), (d_s, s_in)):
    variables = jax.jit(d.init)(jax.random.key(2), x)
    assert set(variables) == {"params"}
    apply = jax.jit(d.apply)
    logits = apply(variables, x)
    assert logits.shape == (B, expected, expected, 1) and logits.dtype == jnp.float32
    # No normalisation: one sample scored alone gets the same logits.
    np.testing.assert_allclose(apply(variables, x[:1]), logits[:1], rtol=1e-5, atol=1e-6)
  for n in (1, 3):
    d = fptn.PatchDiscriminator(channels=C, layers=n, compute=Compute(dtype=jnp.bfloat16))
    out = jax.eval_shape(lambda x: d.apply(d.init(jax.random.key(2), x), x), a_in)
    assert out.shape == (B, H >> n, W >> n, 1) and out.dtype == jnp.float32


LOGITS = {
    "real_a": np.array([[2.0, -1.0], [0.5, 300.0]], np.float32),
    "fake_a": np.array([[-3.0, 1.0], [-400.0, 0.0]], np.float32),
    "real_s": np.array([[0.25, -250.0], [4.0, 1.5]], np.float32),
    "fake_s": np.array([[1.0, 2.0], [-0.5, 500.0]], np.float32),
}


def test_discriminator_loss_matches_eq6():
  l = LOGITS
  got = fptn.discriminator_loss(l["real_a"], l["fake_a"], l["real_s"], l["fake_s"])
  # log D = -softplus(-x), log(1 - D) = -softplus(x), in float64 numpy.
  want = (_nll(l["real_a"]).mean() + _nll(l["real_s"]).mean()
          + _nll(-l["fake_a"]).mean() + _nll(-l["fake_s"]).mean())
  assert got.dtype == jnp.float32 and got.shape == ()
  assert np.isfinite(float(got))
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  # Moderate logits: the naive formula with probabilities agrees.
  x = {k: np.clip(v, -5, 5).astype(np.float64) for k, v in l.items()}
  p = {k: 1.0 / (1.0 + np.exp(-v)) for k, v in x.items()}
  naive = -np.mean(np.log(p["real_a"]) + np.log(p["real_s"])) - np.mean(
      np.log(1 - p["fake_a"]) + np.log(1 - p["fake_s"]))
  got = fptn.discriminator_loss(*(x[k].astype(np.float32)
                                  for k in ("real_a", "fake_a", "real_s", "fake_s")))
  np.testing.assert_allclose(float(got), naive, rtol=1e-5)


def test_generator_adversarial_loss_is_non_saturating():
  l = LOGITS
  got = fptn.generator_adversarial_loss(l["fake_a"], l["fake_s"])
  want = _nll(l["fake_a"]).mean() + _nll(l["fake_s"]).mean()
  assert np.isfinite(float(got))
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  # Confidently rejected fakes (large negative logits) still give a gradient of ~-1 per logit.
  grad = jax.grad(lambda x: fptn.generator_adversarial_loss(x, x))(jnp.full((4,), -50.0))
  np.testing.assert_allclose(np.asarray(grad), -2.0 / 4, rtol=1e-6)
  grads = jax.grad(fptn.discriminator_loss, argnums=(0, 1, 2, 3))(
      *(jnp.asarray(l[k]) for k in ("real_a", "fake_a", "real_s", "fake_s")))
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_transfer_and_perceptual_l1_match_their_formulas():
  _, _, _, target = _inputs(1)
  generated = _inputs(2)[3]
  want = np.abs(generated.astype(np.float64) - target).mean()
  np.testing.assert_allclose(float(fptn.transfer_l1(generated, target)), want, rtol=1e-6)
  phi = lambda x: jnp.stack([x[..., 0] * 2.0, x[..., 1:].sum(-1)], -1)
  phi_np = lambda x: np.stack([x[..., 0] * 2.0, x[..., 1:].sum(-1)], -1)
  np.testing.assert_allclose(float(fptn.perceptual_l1(generated, target, phi)),
                             np.abs(phi_np(generated.astype(np.float64)) - phi_np(target)).mean(),
                             rtol=1e-5)


def test_pose_transfer_loss_weights_and_optional_perceptual_term():
  _, _, _, target = _inputs(1)
  generated = _inputs(2)[3]
  l = LOGITS
  assert (fptn.SHT_LOSS_WEIGHTS.adversarial, fptn.SHT_LOSS_WEIGHTS.l1,
          fptn.SHT_LOSS_WEIGHTS.perceptual) == (0.05, 0.01, 0.01)
  adversarial = _nll(l["fake_a"]).mean() + _nll(l["fake_s"]).mean()
  l1 = np.abs(generated.astype(np.float64) - target).mean()
  total, terms = fptn.pose_transfer_loss(generated, target, l["fake_a"], l["fake_s"])
  assert set(terms) == {"adversarial", "l1"}
  np.testing.assert_allclose(float(total), 0.05 * adversarial + 0.01 * l1, rtol=1e-6)
  calls = []

  def phi(x):
    calls.append(x.shape)
    return x * 3.0

  weights = fptn.PoseTransferWeights(adversarial=1.0, l1=2.0, perceptual=0.5)
  total_p, terms_p = fptn.pose_transfer_loss(generated, target, l["fake_a"], l["fake_s"],
                                             weights=weights, perceptual_fn=phi)
  assert calls == [generated.shape, target.shape]
  assert set(terms_p) == {"adversarial", "l1", "perceptual"}
  np.testing.assert_allclose(float(terms_p["perceptual"]), 3.0 * l1, rtol=1e-5)
  np.testing.assert_allclose(float(total_p), adversarial + 2.0 * l1 + 0.5 * 3.0 * l1, rtol=1e-6)
  total_none, _ = fptn.pose_transfer_loss(generated, target, l["fake_a"], l["fake_s"],
                                          weights=weights)
  np.testing.assert_allclose(float(total_p - total_none), 0.5 * 3.0 * l1, rtol=1e-5)


def test_adam_steps_lower_the_discriminator_loss():
  image, _, h_tar, target = _inputs()
  fake = _inputs(3)[3] * 0.3 + 1.0  # a fixed, distinguishable "generated" face
  (a_real, s_real), (a_fake, s_fake) = (fptn.discriminator_inputs(image, h_tar, target),
                                        fptn.discriminator_inputs(image, h_tar, fake))
  d_a = fptn.PatchDiscriminator(channels=C, layers=2)
  d_s = fptn.PatchDiscriminator(channels=C, layers=2)
  params = jax.jit(lambda a, s: {"a": d_a.init(jax.random.key(3), a)["params"],
                                  "s": d_s.init(jax.random.key(4), s)["params"]})(a_real, s_real)

  def loss(p):
    return fptn.discriminator_loss(d_a.apply({"params": p["a"]}, a_real),
                                   d_a.apply({"params": p["a"]}, a_fake),
                                   d_s.apply({"params": p["s"]}, s_real),
                                   d_s.apply({"params": p["s"]}, s_fake))

  optimizer = optax.adam(1e-3)

  @jax.jit
  def step(p, opt_state):
    value, grads = jax.value_and_grad(loss)(p)
    updates, opt_state = optimizer.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, value

  opt_state = optimizer.init(params)
  values = []
  for _ in range(11):  # each step returns the loss before its update
    params, opt_state, value = step(params, opt_state)
    values.append(float(value))
  first, last = values[0], values[-1]
  assert np.isfinite(first)
  assert last < 0.5 * first and all(np.diff(values) < 0), values


def test_parameters_carry_known_logical_axis_names_and_shard():
  image, h_con, h_tar, _ = _inputs()
  generator = fptn.PoseTransferGenerator(channels=C, blocks=2)
  disc = fptn.PatchDiscriminator(channels=C, layers=2)
  trees = [jax.eval_shape(functools.partial(generator.init, train=False), jax.random.key(0),
                          image, h_con, h_tar),
           jax.eval_shape(disc.init, jax.random.key(0), image)]
  # conftest simulates 8 CPU devices: a 1 x 2 ("data", "fsdp") mesh.
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]).reshape(1, 2), partitioning.MESH_AXES)
  for tree in trees:
    specs = jax.tree.leaves(nn.get_partition_spec(tree["params"]),
                            is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
    assert specs and all(len(s) == 4 or len(s) == 1 for s in specs)
    names = {n for s in specs for n in s}
    assert names <= set(models.LOGICAL_AXIS_NAMES), names
    shardings = models.variable_shardings(tree, mesh, models.logical_axis_rules("fsdp"))
    split = [s for s in jax.tree.leaves(shardings) if "fsdp" in tuple(s.spec)]
    assert split  # the wide convolutions are split over "fsdp"
