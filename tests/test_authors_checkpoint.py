"""Importing the authors' released checkpoint (fgtbt_jax/weights/: pth.py reads it, authors.py maps and converts it, import_authors.py writes the run).

Checkpoints are written here with torch.save in the released structure
(`{"model": {"name", "args": yacs CfgNode, "sd"}, "epoch", "optimizer"}`),
the CfgNode being a class of this file registered as `yacs.config.CfgNode`
so the pickle names it as the real one does. The importer reads them
without torch or yacs:
* the 929 entries of the released state dict (tests/assets, names and
  shapes) land where the name map of AUTHORS_CODE section 1 says, in Flax
  layouts; converted layers compute what their PyTorch layers compute;
* a bare torch.save(state_dict) and DataParallel's `module.` names import
  as the released structure does; float16 / bfloat16 tensors are converted
  and the load report says so;
* pickled code, truncated files, non-checkpoints and state dicts with
  missing, extra or mis-shaped entries are refused with one-line errors;
  names off by a prefix get a one-line hint naming it;
* the written workdir restores as the dataset's best EMA model, and
  `run.py eval` / `run.py predict` run on it (slow).
"""

import collections
import json
import pathlib
import pickle
import re
import subprocess
import sys
import types
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict

from configs import fgtbt_authors
from fgtbt_jax.weights import authors as ac
from fgtbt_jax.weights import import_authors
from fgtbt_jax import inference
from fgtbt_jax import rundir
from fgtbt_jax import sharding
from fgtbt_jax.models import layers
from tests import helpers
from tests.helpers import synthetic_data_dir  # noqa: F401  (fixture)

RECIPE = fgtbt_authors.get_config()  # The authors recipe; the library imports no config file.

ASSET = pathlib.Path(__file__).parent / "assets" / "authors_state_dict.tsv"
RUN = str(helpers.REPO / "run.py")


class CfgNode(dict):
  """Stands in for yacs.config.CfgNode: a dict with attributes of its own."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.__dict__["__immutable__"] = False


CfgNode.__module__ = "yacs.config"


class _RunsCode:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    import os  # pylint: disable=g-import-not-at-top
    return os.system, (f"touch {self.marker}",)


@pytest.fixture(name="fake_yacs")
def fixture_fake_yacs(monkeypatch):
  module = types.ModuleType("yacs.config")
  module.CfgNode = CfgNode
  monkeypatch.setitem(sys.modules, "yacs", types.ModuleType("yacs"))
  monkeypatch.setitem(sys.modules, "yacs.config", module)


def _released_shapes() -> dict[str, tuple[int, ...]]:
  shapes = {}
  for line in ASSET.read_text().splitlines():
    if line and not line.startswith("#"):
      name, shape = line.split("\t")
      shapes[name] = tuple(int(d) for d in re.findall(r"\d+", shape))
  return shapes


def _random_state_dict(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return collections.OrderedDict(
      (name, torch.tensor(500) if name.endswith("num_batches_tracked")
       else torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)))
      for name, shape in shapes.items())


def _save_bare(path, state_dict):
  """torch.save(model.state_dict()): an OrderedDict of tensors with its `_metadata`."""
  state_dict = collections.OrderedDict(state_dict)
  state_dict._metadata = collections.OrderedDict(  # pylint: disable=protected-access
      (name.rsplit(".", 1)[0], {"version": 1}) for name in state_dict)
  torch.save(state_dict, path)
  return path


def _assert_same_variables(got, expected):
  got, expected = flatten_dict(got), flatten_dict(expected)
  assert got.keys() == expected.keys()
  for key, value in expected.items():
    assert got[key].dtype == np.float32, key
    np.testing.assert_array_equal(got[key], value, err_msg=str(key))


def _save(path, state_dict, epoch=0):
  config = CfgNode({"MODEL": CfgNode({"NAME": "segformer", "DEPTHS": [3, 6, 18, 3]}),
                    "TRAIN": CfgNode({"LR": 2.5e-4})})
  torch.save({"model": {"name": "segformer", "args": config, "sd": state_dict}, "epoch": epoch,
              "optimizer": {"name": "adamw", "args": config, "sd": {}}}, path)
  return path


def _tiny_shapes():
  return ac.authors_state_dict_shapes(import_authors.run_config(RECIPE, "WFLW", "tiny").model)


# -- the name map, independently of the implementation --------------------------------

_STEM = {"bn1": "norm_in", "conv1": "conv_in", "bn2": "norm_mid", "proj": "proj",
         "bn3": "norm_out", "conv3": "conv_out", "norm": "norm"}
_BLOCK = {"norm1": "norm1", "norm2": "norm2", "attn.q": "attention/q",
          "attn.kv": "attention/kv", "attn.proj": "attention/proj", "attn.sr": "attention/sr",
          "attn.norm": "attention/sr_norm", "mlp.fc1": "mlp/fc1",
          "mlp.dwconv.dwconv": "mlp/dwconv", "mlp.fc2": "mlp/fc2"}
_HEAD = {"linear_fuse.conv": "fuse", "linear_fuse.bn": "fuse_norm", "linear_pred": "project",
         "conv1.bn1": "conv_block/norm1", "conv1.conv1": "conv_block/conv1",
         "conv1.bn2": "conv_block/norm2", "conv1.conv2": "conv_block/conv2",
         "conv1.bn3": "conv_block/norm3", "conv1.conv3": "conv_block/conv3",
         "conv1.downsample.0": "conv_block/shortcut_norm",
         "conv1.downsample.2": "conv_block/shortcut",
         "upSample.upsample": "upsample", "conv2": "heatmap"}
_LAYER_NORMS = ("norm1", "norm2", "attention/sr_norm", "/norm")


def _project_layer(module: str) -> str:
  """AUTHORS_CODE section 1's table: the project layer of an authors' module."""
  stage = lambda i: f"encoder/stage_{int(i) - 1}"
  rules = (
      (r"encoder\.backbone\.patch_embed(\d)\.(\w+)",
       lambda m: f"{stage(m[1])}/patch_embed/{_STEM[m[2]]}"),
      (r"encoder\.backbone\.block(\d)\.(\d+)\.(.+)",
       lambda m: f"{stage(m[1])}/block_{m[2]}/{_BLOCK[m[3]]}"),
      (r"encoder\.backbone\.norm(\d)", lambda m: f"{stage(m[1])}/norm"),
      (r"encoder\.backbone\.prompt_generator\.handcrafted_generator(\d)\.(\w+)",
       lambda m: f"{stage(m[1])}/fgsa/refine/{_STEM[m[2]]}"),
      (r"encoder\.backbone\.prompt_generator\.embedding_generator(\d)",
       lambda m: f"{stage(m[1])}/fgsa/image_proj"),
      (r"encoder\.backbone\.prompt_generator\.lightweight_mlp(\d)_(\d+)\.0",
       lambda m: f"{stage(m[1])}/fgsa/reduce_{m[2]}"),
      (r"encoder\.backbone\.prompt_generator\.shared_mlp(\d)",
       lambda m: f"{stage(m[1])}/fgsa/expand"),
      (r"encoder\.backbone\.prompt_generator\.bn(\d)", lambda m: f"{stage(m[1])}/fgsa/norm"),
      (r"encoder\.backbone\.prompt_generator\.conv(\d)", lambda m: f"{stage(m[1])}/fgsa/conv"),
      (r"encoder\.backbone\.prompt_generator\.shared_csam(\d)\.semantic_att\.linear\.([02])",
       lambda m: f"{stage(m[1])}/fgsa/channel_attention/{'squeeze' if m[2] == '0' else 'excite'}"),
      (r"encoder\.decode_head\.linear_c(\d)\.proj", lambda m: f"decoder/embed_{int(m[1]) - 1}"),
      (r"encoder\.decode_head\.(.+)", lambda m: f"decoder/{_HEAD[m[1]]}"),
  )
  for pattern, layer in rules:
    match = re.fullmatch(pattern, module)
    if match:
      return layer(match)
  raise AssertionError(f"no rule for {module}")


def _expected(name: str, tensor: np.ndarray, batch_norms: set[str]) -> tuple[tuple, np.ndarray]:
  """(variable path, Flax-layout value) the name map puts a state-dict tensor at."""
  module, leaf = name.rsplit(".", 1)
  layer = tuple(_project_layer(module).split("/"))
  if module in batch_norms:
    collection, flax_leaf = {"weight": ("params", "scale"), "bias": ("params", "bias"),
                             "running_mean": ("batch_stats", "mean"),
                             "running_var": ("batch_stats", "var")}[leaf]
  elif "/".join(layer).endswith(_LAYER_NORMS):
    collection, flax_leaf = "params", {"weight": "scale", "bias": "bias"}[leaf]
  else:
    collection, flax_leaf = "params", {"weight": "kernel", "bias": "bias"}[leaf]
  if flax_leaf != "kernel":
    value = tensor
  elif tensor.ndim == 2:  # Linear (out, in) -> (in, out)
    value = tensor.T
  elif layer[-1] == "conv" and layer[-2] == "fgsa":  # 1x1 conv applied as a dense layer
    value = tensor[:, :, 0, 0].T
  elif layer[-1] == "upsample":  # ConvTranspose (in, out, kh, kw), flipped
    value = tensor.transpose(2, 3, 0, 1)[::-1, ::-1]
  else:  # Conv (out, in, kh, kw) -> (kh, kw, in, out)
    value = tensor.transpose(2, 3, 1, 0)
  return (collection, *layer, flax_leaf), value


def test_name_map_gives_the_released_state_dict():
  shapes = ac.authors_state_dict_shapes(import_authors.run_config(RECIPE, "WFLW").model)
  released = _released_shapes()
  assert len(released) == 929
  assert shapes == released


def test_every_released_entry_lands_where_the_name_map_says(tmp_path, fake_yacs):
  released = _released_shapes()
  state_dict = _random_state_dict(released)
  path = _save(tmp_path / "full_model_epoch0_best_wflw.pth", state_dict)
  sys.modules.pop("yacs.config")  # The reader needs no yacs.
  checkpoint = ac.read_checkpoint(path)
  assert checkpoint.epoch == 0 and checkpoint.args["MODEL"]["NAME"] == "segformer"
  assert list(checkpoint.state_dict) == list(released)
  variables, report = ac.convert_state_dict(checkpoint.state_dict,
                                            import_authors.run_config(RECIPE, "WFLW").model, str(path))
  flat = flatten_dict(variables)
  batch_norms = {n.rsplit(".", 1)[0] for n in released if n.endswith("running_mean")}
  assert len(batch_norms) == 33 and report.batches_tracked == {500: 33}
  used = [n for n in released if "conv_seg" not in n and not n.endswith("num_batches_tracked")]
  assert len(used) == 894 == len(report.loaded) == len(flat)
  assert sorted(report.dropped) == sorted(set(released) - set(used))
  assert not (report.missing or report.unexpected or report.mismatched)
  for name in used:
    path, value = _expected(name, state_dict[name].numpy(), batch_norms)
    assert path in flat, (name, path)
    np.testing.assert_array_equal(flat[path], value, err_msg=name)
  assert "missing 0, unexpected 0, shape mismatches 0" in report.summary()
  assert "500 in 33" in report.summary()


def test_converted_layers_compute_what_the_pytorch_layers_compute(tmp_path, fake_yacs):
  shapes = _tiny_shapes()
  state_dict = _random_state_dict(shapes, seed=1)
  path = _save(tmp_path / "tiny.pth", state_dict)
  variables, _ = ac.convert_state_dict(ac.read_checkpoint(path).state_dict,
                                       import_authors.run_config(RECIPE, "WFLW", "tiny").model)
  params = variables["params"]
  x = np.random.default_rng(2).normal(size=(2, 16, 6, 6)).astype(np.float32)  # NCHW
  nhwc = jnp.asarray(x.transpose(0, 2, 3, 1))
  with torch.no_grad():
    # ConvTranspose2d(4, stride 2, padding 1).
    name = "encoder.decode_head.upSample.upsample"
    w, b = state_dict[name + ".weight"], state_dict[name + ".bias"]
    expected = torch.nn.functional.conv_transpose2d(torch.from_numpy(x), w, b, 2, 1).numpy()
    layer = layers.conv_transpose(16, 4, 2, 1, "decoder", dtype=jnp.float32)
    got = layer.apply({"params": params["decoder"]["upsample"]}, nhwc)
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), expected, atol=1e-4)
    # 3x3 convolution without bias (the heatmap layer).
    expected = torch.nn.functional.conv2d(
        torch.from_numpy(x), state_dict["encoder.decode_head.conv2.weight"], padding=1).numpy()
    layer = layers.conv(124, 3, "heatmaps", padding=1, use_bias=False, dtype=jnp.float32)
    got = layer.apply({"params": params["decoder"]["heatmap"]}, nhwc)
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), expected, atol=1e-4)
    # The FGSA 1x1 conv (24 = 1.5 x 16 channels), a dense layer in the project.
    name = "encoder.backbone.prompt_generator.conv1"
    m = np.random.default_rng(3).normal(size=(2, 24, 4, 4)).astype(np.float32)
    expected = torch.nn.functional.conv2d(torch.from_numpy(m), state_dict[name + ".weight"],
                                          state_dict[name + ".bias"]).numpy()
    dense = params["encoder"]["stage_0"]["fgsa"]["conv"]
    got = m.transpose(0, 2, 3, 1) @ dense["kernel"] + dense["bias"]
    np.testing.assert_allclose(got.transpose(0, 3, 1, 2), expected, atol=1e-4)


def test_tensor_views_dtypes_and_offsets_are_read_as_torch_lays_them_out(tmp_path, fake_yacs):
  base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
  tensors = {"transposed": base.t(), "sliced": base[1:3, 2:5], "half": torch.ones(3).half() / 3,
             "bfloat16": torch.tensor([1.5, -2.25]).bfloat16(), "long": torch.tensor(500)}
  path = _save(tmp_path / "views.pth", collections.OrderedDict(tensors))
  state_dict = ac.read_checkpoint(path).state_dict
  for name, tensor in tensors.items():
    assert state_dict[name].shape == tuple(tensor.shape), name
    np.testing.assert_array_equal(state_dict[name].astype(np.float64),
                                  tensor.double().numpy(), err_msg=name)


# -- refusals --------------------------------------------------------------------------


def _one_line_error(path, match):
  with pytest.raises(ac.AuthorsCheckpointError, match=match) as caught:
    ac.read_checkpoint(path)
  assert "\n" not in str(caught.value) and str(caught.value).startswith(str(path))
  return caught.value


def test_pickled_code_is_refused_and_never_runs(tmp_path):
  marker = tmp_path / "ran"
  path = tmp_path / "evil.pth"
  torch.save({"model": {"name": "segformer", "sd": {"w": torch.ones(2)}},
              "epoch": _RunsCode(marker)}, path)
  _one_line_error(path, r"refusing to unpickle (posix|os|nt)\.system")
  assert not marker.exists()


def test_not_a_checkpoint(tmp_path, fake_yacs):
  random_file = tmp_path / "random.pth"
  random_file.write_bytes(np.random.default_rng(0).bytes(4096))
  _one_line_error(random_file, "not a torch.save checkpoint")
  no_pickle = tmp_path / "no_pickle.pth"
  with zipfile.ZipFile(no_pickle, "w") as archive:
    archive.writestr("archive/version", "3")
  _one_line_error(no_pickle, "no data.pkl")
  # Neither the release's structure nor a bare state dict: the error says what it found.
  accepted = (r"not an FGTBT authors' checkpoint: expected the release's \{'model': \{'sd': "
              r"<state dict>, \.\.\.\}, 'epoch': \.\.\.\} or a bare torch\.save\(state_dict\) "
              "of names and tensors, found ")
  wrapped = tmp_path / "lightning.pth"
  torch.save({"epoch": 3, "state_dict": {"encoder.backbone.norm1.weight": torch.ones(4)}},
             wrapped)
  _one_line_error(wrapped, accepted + r"a dict with keys \['epoch', 'state_dict'\] \('epoch': int, "
                  r"not a tensor\)$")
  mixed = tmp_path / "mixed.pth"
  torch.save({"encoder.backbone.norm1.weight": torch.ones(4), "step": "last"}, mixed)
  _one_line_error(mixed, accepted + r".*\('step': str, not a tensor\)$")
  empty = tmp_path / "empty.pth"
  torch.save({}, empty)
  _one_line_error(empty, accepted + "an empty dict$")
  tensors = tmp_path / "list.pth"
  torch.save([torch.ones(4)], tensors)
  _one_line_error(tensors, accepted + "a list$")
  raw_pickle = tmp_path / "plain.pkl"
  raw_pickle.write_bytes(pickle.dumps({"model": {}}))
  _one_line_error(raw_pickle, "not a torch.save checkpoint")
  with pytest.raises(IsADirectoryError, match="a folder, not a checkpoint file; name the .pth"):
    ac.read_checkpoint(tmp_path)


def test_truncated_file(tmp_path, fake_yacs):
  path = _save(tmp_path / "full.pth", _random_state_dict(_tiny_shapes()))
  data = path.read_bytes()
  for size in (len(data) // 2, len(data) - 10):
    truncated = tmp_path / f"truncated_{size}.pth"
    truncated.write_bytes(data[:size])
    _one_line_error(truncated, "truncated")


@pytest.mark.parametrize("change, match", [
    ("drop", r"tiny\.pth:encoder\.decode_head\.conv2\.weight: missing from the state dict$"),
    ("add", r"tiny\.pth:encoder\.backbone\.extra\.weight: not a tensor of the model$"),
    ("reshape", r"tiny\.pth:encoder\.backbone\.norm1\.weight: shape \(17,\) in the file, "
                r"the model needs \(16,\)$"),
    ("two", r"missing from the state dict \(and 1 more problem: see the load report\)$"),
])
def test_state_dict_that_does_not_fit(tmp_path, fake_yacs, change, match):
  state_dict = _random_state_dict(_tiny_shapes())
  if change in ("drop", "two"):
    del state_dict["encoder.decode_head.conv2.weight"]
  if change in ("add", "two"):
    state_dict["encoder.backbone.extra.weight"] = torch.ones(3)
  if change == "reshape":
    state_dict["encoder.backbone.norm1.weight"] = torch.ones(17)
  path = _save(tmp_path / "tiny.pth", state_dict)
  checkpoint = ac.read_checkpoint(path)
  with pytest.raises(ac.AuthorsCheckpointError, match=match) as caught:
    ac.convert_state_dict(checkpoint.state_dict, import_authors.run_config(RECIPE, "WFLW", "tiny").model, str(path))
  assert "\n" not in str(caught.value) and not caught.value.report.ok
  # Nothing is written when the file does not fit.
  workdir = tmp_path / "run"
  with pytest.raises(ac.AuthorsCheckpointError):
    import_authors.import_authors_checkpoint(path, workdir, "WFLW", recipe=RECIPE, variant="tiny")
  assert not workdir.exists()


# -- other files of the same network ------------------------------------------------


def test_a_bare_state_dict_imports_as_the_released_file_does(tmp_path, fake_yacs):
  state_dict = _random_state_dict(_tiny_shapes(), seed=4)
  released = ac.read_checkpoint(_save(tmp_path / "released.pth", state_dict, epoch=3))
  bare = ac.read_checkpoint(_save_bare(tmp_path / "bare.pth", state_dict))
  assert (released.structure, released.epoch) == (ac.RELEASE, 3)
  assert (bare.structure, bare.epoch, bare.args) == (ac.BARE_STATE_DICT, None, None)
  assert list(bare.state_dict) == list(released.state_dict) == list(state_dict)
  model = import_authors.run_config(RECIPE, "WFLW", "tiny").model
  expected, _ = ac.convert_state_dict(released.state_dict, model)
  got, report = ac.convert_state_dict(bare.state_dict, model)
  assert report.ok and len(report.loaded) == 330 and not (report.prefix or report.converted)
  _assert_same_variables(got, expected)
  # Through the import: no epoch, so step 0; the record says which structure it read.
  result = import_authors.import_authors_checkpoint(tmp_path / "bare.pth", tmp_path / "run", "wflw",
                                        recipe=RECIPE, variant="tiny")
  assert (result.dataset, result.step, len(result.report.loaded)) == ("WFLW", 0, 330)
  record = json.loads((tmp_path / "run" / import_authors.IMPORT_RECORD).read_text())
  assert (record["structure"], record["epoch"], record["prefix_stripped"]) == (
      "state_dict", None, "")


@pytest.mark.parametrize("prefix", ["module.", "module.module."])
@pytest.mark.parametrize("bare", [True, False], ids=["bare", "released"])
def test_data_parallel_names_import_without_their_prefix(tmp_path, fake_yacs, prefix, bare):
  state_dict = _random_state_dict(_tiny_shapes(), seed=5)
  prefixed = collections.OrderedDict((prefix + name, t) for name, t in state_dict.items())
  path = (_save_bare if bare else _save)(tmp_path / "parallel.pth", prefixed)
  model = import_authors.run_config(RECIPE, "WFLW", "tiny").model
  expected, _ = ac.convert_state_dict({n: t.numpy() for n, t in state_dict.items()}, model)
  got, report = ac.convert_state_dict(ac.read_checkpoint(path).state_dict, model, str(path))
  assert report.ok and report.prefix == prefix and len(report.loaded) == 330
  assert all(not name.startswith("module.") for name in report.loaded)
  assert report.batches_tracked == {500: 33}
  _assert_same_variables(got, expected)
  assert (f"names read without their {prefix!r} prefix (torch.nn.DataParallel / "
          "DistributedDataParallel)") in report.summary().splitlines()


def test_data_parallel_names_with_a_tensor_missing(tmp_path, fake_yacs):
  state_dict = _random_state_dict(_tiny_shapes())
  del state_dict["encoder.decode_head.conv2.weight"]
  path = _save_bare(tmp_path / "parallel.pth",
                    {"module." + name: t for name, t in state_dict.items()})
  with pytest.raises(ac.AuthorsCheckpointError, match=(
      r"parallel\.pth:module\.encoder\.decode_head\.conv2\.weight: missing from the state "
      r"dict$")) as caught:
    ac.convert_state_dict(ac.read_checkpoint(path).state_dict, import_authors.run_config(RECIPE, "WFLW", "tiny").model,
                          str(path))
  assert caught.value.report.prefix == "module." and not caught.value.report.hint


def _renamed(state_dict, change):
  """The state dict with its names changed: a prefix on all, on every other one, or one removed."""
  if change == "all":
    return {"net." + name: t for name, t in state_dict.items()}
  if change == "half":
    return {("module." + name if i % 2 else name): t
            for i, (name, t) in enumerate(state_dict.items())}
  return {name.removeprefix("encoder."): t for name, t in state_dict.items()}


@pytest.mark.parametrize("change, hint", [
    ("all", r"\(330 of its 330 tensors missing, 365 unexpected names\): 365 of the file's 365 "
            r"keys start with 'net\.'; without it 330 of the model's 330 tensors would be found, "
            r"0 are: re-save the state dict with the prefix stripped$"),
    ("half", r"\(165 of its 330 tensors missing, 182 unexpected names\): 182 of the file's 365 "
             r"keys start with 'module\.'; without it 330 of the model's 330 tensors would be "
             r"found, 165 are: re-save the state dict with the prefix stripped$"),
    ("lack", r"\(330 of its 330 tensors missing, 365 unexpected names\): the file's keys lack "
             r"the prefix 'encoder\.'; with it 330 of the model's 330 tensors would be found, 0 "
             r"are: re-save the state dict with the prefix added$"),
])
def test_names_off_by_a_prefix_get_a_one_line_hint(tmp_path, fake_yacs, change, hint):
  state_dict = _random_state_dict(_tiny_shapes())
  assert len(state_dict) == 365
  path = _save_bare(tmp_path / "renamed.pth", _renamed(state_dict, change))
  with pytest.raises(ac.AuthorsCheckpointError, match=(
      r"^" + re.escape(str(path)) + r": the state dict's names do not fit the model " + hint)
                     ) as caught:
    ac.convert_state_dict(ac.read_checkpoint(path).state_dict, import_authors.run_config(RECIPE, "WFLW", "tiny").model,
                          str(path))
  report = caught.value.report
  assert "\n" not in str(caught.value) and report.hint and not report.prefix
  assert f"hint: {report.hint}" in report.summary().splitlines()


def test_float16_and_bfloat16_tensors_are_converted_and_reported(tmp_path, fake_yacs):
  state_dict = _random_state_dict(_tiny_shapes(), seed=6)
  halves = collections.OrderedDict()
  for i, (name, tensor) in enumerate(state_dict.items()):
    if not name.endswith("num_batches_tracked"):
      tensor = tensor.bfloat16() if i % 10 == 0 else tensor.half()
    halves[name] = tensor
  bfloat16 = sum(t.dtype == torch.bfloat16 for name, t in halves.items() if "conv_seg" not in name)
  path = _save_bare(tmp_path / "half.pth", halves)
  model = import_authors.run_config(RECIPE, "WFLW", "tiny").model
  got, report = ac.convert_state_dict(ac.read_checkpoint(path).state_dict, model, str(path))
  assert report.ok and report.converted == {"bfloat16": bfloat16, "float16": 330 - bfloat16}
  assert 0 < bfloat16 < 330
  assert (f"converted to float32: {bfloat16} bfloat16, {330 - bfloat16} float16 tensors"
          in report.summary().splitlines())
  # The values are the half-precision ones, exactly (the conversion is exact).
  expected, _ = ac.convert_state_dict({n: t.float().numpy() for n, t in halves.items()}, model)
  _assert_same_variables(got, expected)
  # float32 files say nothing about it.
  _, report = ac.convert_state_dict({n: t.numpy() for n, t in state_dict.items()}, model)
  assert report.converted == {} and "converted" not in report.summary()
  # The workdir's record keeps it.
  import_authors.import_authors_checkpoint(path, tmp_path / "run", "WFLW", recipe=RECIPE,
                                           variant="tiny")
  record = json.loads((tmp_path / "run" / import_authors.IMPORT_RECORD).read_text())
  assert record["converted_to_float32"] == {"bfloat16": bfloat16, "float16": 330 - bfloat16}


def test_dataset_from_the_file_name():
  assert import_authors.dataset_from_filename("full_model_epoch0_best_wflw.pth") == "WFLW"
  assert import_authors.dataset_from_filename("x/full_model_epoch0_best_300w.pth") == "300W"
  assert import_authors.dataset_from_filename("full_model_epoch0_best_cofw.pth") == "COFW"
  assert import_authors.dataset_from_filename("full_model_epoch10000_.pth") is None
  assert import_authors.dataset_from_filename("full_model_epoch0_best_imagenet.pth") is None


# -- the workdir ----------------------------------------------------------------------


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "fgtbt_jax.commands", "import-authors", *args],
                        env=helpers.subprocess_env(devices=1), cwd=helpers.REPO,
                        capture_output=True, text=True, timeout=300, check=False)


def test_the_workdir_restores_as_the_best_ema_model(tmp_path, fake_yacs):
  shapes = _tiny_shapes()
  path = _save(tmp_path / "full_model_epoch7_best_cofw.pth", _random_state_dict(shapes), epoch=7)
  workdir = tmp_path / "run"
  result = import_authors.import_authors_checkpoint(path, workdir, recipe=RECIPE, variant="tiny")
  assert (result.dataset, result.step, len(result.report.loaded)) == ("COFW", 7, 330)
  config = rundir.load_run_config(workdir)
  assert config.model.fgsa_compat == "authors" and config.model.variant == "tiny"
  assert config.model.batch_norm_unbiased_variance is True
  assert tuple(config.data.datasets) == ("COFW",) and config.data.eval_batch_size == 8
  assert config.data.image_size == config.model.input_size == 64
  mesh = sharding.single_device_mesh()
  [restored] = inference.restore_models(config, workdir, "best", mesh,
                                        sharding.logical_rules(config.mesh.logical_axis_rules))
  assert (restored.datasets, restored.step) == (["COFW"], 7)
  expected, _ = ac.convert_state_dict(ac.read_checkpoint(path).state_dict, config.model)
  got = flatten_dict(jax.device_get(restored.variables))
  for key, value in flatten_dict(expected).items():
    np.testing.assert_array_equal(got[key], value, err_msg=str(key))
  # A second import into the same workdir is refused.
  with pytest.raises(FileExistsError, match="already holds a run"):
    import_authors.import_authors_checkpoint(path, workdir, recipe=RECIPE, variant="tiny")


def test_cli_errors_are_one_line(tmp_path, fake_yacs):
  path = _save(tmp_path / "full_model_epoch0_.pth", _random_state_dict(_tiny_shapes()))
  done = _cli("--authors-checkpoint", str(path), "--workdir", str(tmp_path / "run"),
              "--variant", "tiny")
  assert done.returncode == 1
  assert done.stderr.strip().splitlines() == [
      f"fgtbt import-authors: {path}: which dataset's best model is this? The file name has no "
      "_best_<dataset> suffix; pass the dataset, one of ('WFLW', '300W', 'COFW', 'AFLW')"]
  assert not (tmp_path / "run").exists()


def test_cli_names_off_by_a_prefix_is_one_line_not_a_dump(tmp_path, fake_yacs):
  path = _save_bare(tmp_path / "renamed.pth", _renamed(_random_state_dict(_tiny_shapes()), "all"))
  done = _cli("--authors-checkpoint", str(path), "--workdir", str(tmp_path / "run"),
              "--dataset", "wflw", "--variant", "tiny")
  assert done.returncode == 1 and done.stdout == ""
  [line] = done.stderr.strip().splitlines()
  assert line.startswith(f"fgtbt import-authors: {path}: the state dict's names do not fit")
  assert "start with 'net.'; without it 330 of the model's 330 tensors would be found" in line
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_run_py_eval_and_predict_accept_the_workdir(tmp_path, fake_yacs, synthetic_data_dir):
  path = _save(tmp_path / "full_model_epoch0_best_wflw.pth", _random_state_dict(_tiny_shapes()))
  workdir = tmp_path / "authors_wflw"
  done = _cli("--authors-checkpoint", str(path), "--workdir", str(workdir), "--variant", "tiny")
  assert done.returncode == 0, done.stderr
  assert "loaded 330 tensors" in done.stdout and "500 in 33" in done.stdout
  env = helpers.subprocess_env(devices=1)
  run = lambda *args: subprocess.run([sys.executable, RUN, *args], env=env, cwd=helpers.REPO,
                                     capture_output=True, text=True, timeout=600, check=False)
  # No train state: eval reads the best model by default, with the authors' evaluation.
  evaluated = run("eval", f"--workdir={workdir}", "--report=false",
                  f"--config.data.data_dir={synthetic_data_dir}")
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert "best checkpoint(s)" in evaluated.stdout
  assert re.search(r"^WFLW\s+\d", evaluated.stdout, re.MULTILINE), evaluated.stdout
  out = tmp_path / "predictions"
  predicted = run("predict", f"--workdir={workdir}",
                  f"--image={helpers.REPO / 'docs' / 'sample_faces' / 'face_frontal.jpg'}",
                  "--box=10,10,200,200", f"--out={out}")
  assert predicted.returncode == 0, predicted.stderr[-3000:]
  assert (out / "face_frontal.jpg.json").is_file()
