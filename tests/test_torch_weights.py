"""PyTorch MiT/SegFormer weight import (fgtbt_jax/weights/imagenet.py; .pth files read by weights/pth.py).

The parity test builds a transformers SegformerModel with random weights and
requires the converted Flax encoder to reproduce its four stage outputs.
"""

import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from fgtbt_jax import models
from fgtbt_jax.commands import import_imagenet
from fgtbt_jax.weights import imagenet as torch_weights
from fgtbt_jax.models import (
    ENCODERS, abstract_variables, build_encoder, build_model, model_config, parameter_count)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VARIANT = "b0"  # two blocks per stage: block indices > 0 are exercised


def _hf_config(variant):
  spec = ENCODERS[variant]
  return transformers.SegformerConfig(
      num_encoder_blocks=4, depths=list(spec.depths), hidden_sizes=list(spec.dims),
      num_attention_heads=list(spec.num_heads), sr_ratios=list(spec.sr_ratios),
      decoder_hidden_size=32)


@pytest.fixture(scope="module")
def hf_model():
  torch.manual_seed(0)
  model = transformers.SegformerModel(_hf_config(VARIANT)).eval()
  with torch.no_grad():  # non-trivial norm parameters
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def state_dict(hf_model):
  return {k: v.numpy().copy() for k, v in hf_model.state_dict().items()}


def _config(**overrides):
  # transformers uses LayerNorm eps 1e-5 everywhere.
  kwargs = dict(patch_embed="plain", fgsa=False, norm_epsilon=1e-5, embed_norm_epsilon=1e-5)
  return model_config(VARIANT, **{**kwargs, **overrides})


def _template(config):
  """A params collection to convert into (numpy-filled: cheap)."""
  return models.random_variables(abstract_variables(build_model(config), 64), seed=1)["params"]


def _to_nvlabs(state):
  """transformers >= 5 names -> NVlabs mit_b*.pth names (k and v fused)."""
  out = {}
  for name, value in state.items():
    m = re.fullmatch(r"stages\.(\d)\.(.*)", name)
    i, rest = int(m[1]) + 1, m[2]
    rest = (rest.replace("patch_embeddings.layer_norm", "norm")
            .replace("patch_embeddings.proj", "proj"))
    if rest.startswith(("proj", "norm")):
      out[f"patch_embed{i}.{rest}"] = value
      continue
    if rest.startswith("layer_norm."):
      out[f"norm{i}.{rest[len('layer_norm.'):]}"] = value
      continue
    b = re.fullmatch(r"blocks\.(\d+)\.(.*)", rest)
    j, layer = b[1], b[2]
    for old, new in [("layernorm_before", "norm1"), ("layernorm_after", "norm2"),
                     ("attention.q_proj", "attn.q"), ("attention.o_proj", "attn.proj"),
                     ("attention.sequence_reduction.sequence_reduction", "attn.sr"),
                     ("attention.sequence_reduction.layer_norm", "attn.norm")]:
      layer = layer.replace(old, new)
    if layer.startswith("attention.v_proj"):
      continue
    if layer.startswith("attention.k_proj"):
      tensor = layer.rsplit(".", 1)[1]
      v = state[f"stages.{i - 1}.blocks.{j}.attention.v_proj.{tensor}"]
      out[f"block{i}.{j}.attn.kv.{tensor}"] = np.concatenate([value, v], axis=0)
      continue
    out[f"block{i}.{j}.{layer}"] = value
  out["head.weight"] = np.zeros((1000, 256), np.float32)  # ImageNet classifier
  return out


def _to_hf_classic(state, prefix="segformer."):
  """transformers >= 5 names -> classic hub names (`segformer.encoder....`)."""
  out = {}
  for name, value in state.items():
    m = re.fullmatch(r"stages\.(\d)\.(.*)", name)
    i, rest = m[1], m[2]
    if rest.startswith("patch_embeddings."):
      out[f"{prefix}encoder.patch_embeddings.{i}.{rest[len('patch_embeddings.'):]}"] = value
      continue
    if rest.startswith("layer_norm."):
      out[f"{prefix}encoder.layer_norm.{i}.{rest[len('layer_norm.'):]}"] = value
      continue
    b = re.fullmatch(r"blocks\.(\d+)\.(.*)", rest)
    layer = b[2]
    for old, new in [("layernorm_before", "layer_norm_1"), ("layernorm_after", "layer_norm_2"),
                     ("attention.q_proj", "attention.self.query"),
                     ("attention.k_proj", "attention.self.key"),
                     ("attention.v_proj", "attention.self.value"),
                     ("attention.o_proj", "attention.output.dense"),
                     ("attention.sequence_reduction.sequence_reduction", "attention.self.sr"),
                     ("attention.sequence_reduction.layer_norm", "attention.self.layer_norm"),
                     ("mlp.fc1", "mlp.dense1"), ("mlp.fc2", "mlp.dense2")]:
      layer = layer.replace(old, new)
    out[f"{prefix}encoder.block.{i}.{b[1]}.{layer}"] = value
  return out


@pytest.fixture(scope="module")
def converted(state_dict):
  config = _config()
  return torch_weights.mit_from_torch(state_dict, config, params=_template(config))


def test_transformers_encoder_parity(hf_model, converted):
  params, report = converted
  assert not report.skipped
  assert not [p for p in report.missing if p.startswith("encoder/")]
  images = np.random.RandomState(0).randn(2, 64, 96, 3).astype(np.float32)
  with torch.no_grad():
    hidden = hf_model(torch.from_numpy(images).permute(0, 3, 1, 2),
                      output_hidden_states=True).hidden_states
  encoder = build_encoder(_config())
  features = jax.jit(lambda p, x: encoder.apply({"params": p}, x))(
      nn.meta.unbox(params)["encoder"], images)
  assert len(hidden) == len(features) == 4
  for expected, got in zip(hidden, features):
    expected = expected.permute(0, 2, 3, 1).numpy()
    assert got.shape == expected.shape
    assert float(np.max(np.abs(np.asarray(got) - expected))) < 1e-4


def test_report_accounts_for_every_tensor(state_dict, converted):
  _, report = converted
  # k and v land in one fused entry: one loaded entry per tensor, minus one per pair.
  pairs = sum(1 for name in state_dict if ".k_proj." in name)
  assert len(report.loaded) == len(state_dict) - pairs
  assert report.loaded["stages.1.blocks.1.mlp.dwconv.dwconv.weight"] == \
      "encoder/stage_1/block_1/mlp/dwconv/kernel"
  assert report.missing and all(p.startswith("decoder/") for p in report.missing)
  text = report.summary()
  assert f"loaded {len(report.loaded)} tensors, skipped 0" in text
  assert "decoder:" in text


def test_layouts_linear_conv_depthwise_and_fused_kv(state_dict, converted):
  params, _ = converted
  stage = nn.meta.unbox(params)["encoder"]["stage_1"]["block_0"]
  prefix = "stages.1.blocks.0."
  np.testing.assert_array_equal(stage["mlp"]["fc1"]["kernel"], state_dict[prefix + "mlp.fc1.weight"].T)
  np.testing.assert_array_equal(
      stage["mlp"]["dwconv"]["kernel"][:, :, 0, 5], state_dict[prefix + "mlp.dwconv.dwconv.weight"][5, 0])
  np.testing.assert_array_equal(
      stage["attention"]["sr"]["kernel"][1, 0, :, 3],
      state_dict[prefix + "attention.sequence_reduction.sequence_reduction.weight"][3, :, 1, 0])
  kv = np.asarray(stage["attention"]["kv"]["kernel"])
  np.testing.assert_array_equal(kv[:, :64], state_dict[prefix + "attention.k_proj.weight"].T)
  np.testing.assert_array_equal(kv[:, 64:], state_dict[prefix + "attention.v_proj.weight"].T)
  np.testing.assert_array_equal(stage["norm1"]["scale"], state_dict[prefix + "layernorm_before.weight"])


def _assert_same_params(a, b):
  flat_a = flatten_dict(nn.meta.unbox(a))
  flat_b = flatten_dict(nn.meta.unbox(b))
  assert flat_a.keys() == flat_b.keys()
  for key in flat_a:
    np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=str(key))


@pytest.mark.parametrize("rename", [
    _to_nvlabs,
    _to_hf_classic,
    lambda s: _to_hf_classic(s, prefix=""),
    lambda s: {f"segformer.{k}": v for k, v in s.items()},
], ids=["nvlabs", "hf_classic", "hf_classic_no_prefix", "transformers_prefixed"])
def test_all_namings_give_the_same_parameters(state_dict, converted, rename):
  config = _config()
  params, report = torch_weights.mit_from_torch(rename(state_dict), config, params=_template(config))
  _assert_same_params(params, converted[0])
  assert set(report.skipped) <= {"head.weight"}
  assert report.missing == converted[1].missing


def test_conv_stem_model_skips_the_plain_patch_embedding_convolutions(state_dict):
  config = _config(patch_embed="conv_stem", fgsa=True)
  params, report = torch_weights.mit_from_torch(state_dict, config, params=_template(config))
  skipped = {name: why for name, why in report.skipped.items()}
  for i in range(4):
    assert "shape mismatch" in skipped[f"stages.{i}.patch_embeddings.proj.weight"]
    assert f"stages.{i}.patch_embeddings.layer_norm.weight" in report.loaded
  assert len(skipped) == 4  # the proj biases fit the conv-stem proj and load
  assert "encoder/stage_0/patch_embed/proj/kernel" in report.missing
  assert "encoder/stage_0/patch_embed/conv_in/kernel" in report.missing
  assert any("/fgsa/" in p for p in report.missing)
  assert "fgsa: " in report.summary() and "shape mismatch" in report.summary()
  untouched = nn.meta.unbox(_template(config))["encoder"]["stage_0"]["patch_embed"]["proj"]["kernel"]
  np.testing.assert_array_equal(
      nn.meta.unbox(params)["encoder"]["stage_0"]["patch_embed"]["proj"]["kernel"], untouched)


def test_unknown_names_and_half_kv_pairs_are_reported(state_dict):
  config = _config()
  state = dict(state_dict)
  state["decode_head.linear_fuse.weight"] = np.zeros((4, 4), np.float32)
  del state["stages.3.blocks.1.attention.v_proj.weight"]
  _, report = torch_weights.mit_from_torch(state, config, params=_template(config))
  assert report.skipped["decode_head.linear_fuse.weight"] == "not a MiT encoder tensor"
  assert "both be present" in report.skipped["stages.3.blocks.1.attention.k_proj.weight"]
  assert "encoder/stage_3/block_1/attention/kv/kernel" in report.missing
  assert "encoder/stage_3/block_1/attention/kv/bias" not in report.missing


def test_boxed_parameters_stay_boxed(state_dict):
  config = _config()
  abstract = abstract_variables(build_model(config), 64)["params"]
  boxed = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), abstract)
  params, _ = torch_weights.mit_from_torch(state_dict, config, params=boxed)
  leaf = params["encoder"]["stage_0"]["block_0"]["mlp"]["fc1"]["kernel"]
  assert isinstance(leaf, nn.LogicallyPartitioned)
  assert leaf.names == ("embed", "mlp")
  np.testing.assert_array_equal(leaf.value, state_dict["stages.0.blocks.0.mlp.fc1.weight"].T)


def test_checkpoint_files_safetensors_and_torch(tmp_path, state_dict):
  from safetensors.numpy import save_file
  nvlabs = _to_nvlabs(state_dict)
  save_file(nvlabs, str(tmp_path / "mit.safetensors"))
  loaded = torch_weights.load_state_dict(tmp_path / "mit.safetensors")
  assert loaded.keys() == nvlabs.keys()
  np.testing.assert_array_equal(loaded["block2.1.attn.kv.weight"], nvlabs["block2.1.attn.kv.weight"])
  torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in nvlabs.items()}},
             tmp_path / "mit.pth")
  from_torch = torch_weights.load_state_dict(tmp_path / "mit.pth")
  assert from_torch.keys() == nvlabs.keys()
  with pytest.raises(ValueError, match="unknown checkpoint type '.ckpt'"):
    (tmp_path / "x.ckpt").write_bytes(b"")
    torch_weights.load_state_dict(tmp_path / "x.ckpt")
  with pytest.raises(FileNotFoundError, match="nothing.pth"):
    torch_weights.load_state_dict(tmp_path / "nothing.pth")


def test_plain_b1_encoder_has_as_many_parameters_as_transformers():
  hf = transformers.SegformerModel(_hf_config("b1"))
  expected = sum(p.numel() for p in hf.parameters())
  abstract = abstract_variables(build_model(model_config("b1", patch_embed="plain", fgsa=False)), 64)
  assert parameter_count(abstract["params"]["encoder"]) == expected


def test_command_line_writes_params_and_prints_the_report(tmp_path, capsys):
  from safetensors.numpy import save_file
  torch.manual_seed(1)
  hf = transformers.SegformerModel(_hf_config("tiny"))
  save_file({k: v.numpy() for k, v in hf.state_dict().items()}, str(tmp_path / "tiny.safetensors"))
  out = tmp_path / "params.msgpack"
  code = import_imagenet.main(["--input", str(tmp_path / "tiny.safetensors"), "--variant", "tiny",
                       "--patch-embed", "plain", "--no-fgsa", "--output", str(out)])
  assert code == 0
  printed = capsys.readouterr().out
  assert "skipped 0" in printed and "wrote" in printed
  params = flax.serialization.msgpack_restore(out.read_bytes())
  np.testing.assert_allclose(
      params["encoder"]["stage_3"]["block_0"]["mlp"]["fc2"]["kernel"],
      hf.state_dict()["stages.3.blocks.0.mlp.fc2.weight"].numpy().T)
  assert params["decoder"]["heatmap"]["kernel"].shape == (3, 3, 16, 124)
  assert float(np.std(params["decoder"]["heatmap"]["kernel"])) > 0  # fresh seeded init
