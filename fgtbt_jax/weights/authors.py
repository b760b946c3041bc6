"""The FGTBT authors' released PyTorch checkpoint: read it and map its names onto the model.

The released file is a `torch.save` zip of
`{"model": {"name": "segformer", "args": <yacs CfgNode>, "sd": <state dict>},
"epoch": int, "optimizer": {...}}`; `["model"]["sd"]` is the EMA model, the
only weight set. A bare `torch.save(model.state_dict())` of the same
network (a mapping of names to tensors, what other repositories' users hold)
is read as well, without an epoch; a `module.` prefix on every name
(torch.nn.DataParallel / DistributedDataParallel) is stripped on conversion.
Either file is read without torch and without yacs, and without running
pickled code (`weights.pth`), and only the model's tensors are read (the
optimizer state is never loaded).

The state dict must hold exactly the tensors of the project's model with
`fgsa_compat="authors"` (929 entries for the paper network: `_LAYERS` maps
the authors' module names onto the project's layers); when the names do not
fit, the error says which prefix, stripped from the file's keys or added to
them, would make them fit, if one would. Tensors are converted to float32;
the load report counts those that were not (float16, bfloat16, ...).
`num_batches_tracked` counters (reported: a released file reads 500 in
every BatchNorm) and the unused `encoder.decode_head.conv_seg` are dropped.
Layouts go to Flax: linear (out, in) -> (in, out); convolution (out, in,
kh, kw) -> (kh, kw, in, out) (`imagenet.to_flax_layout`); the FGSA 1x1
convolution (out, in, 1, 1) -> the project's dense (in, out); ConvTranspose
(in, out, kh, kw) -> the flipped (kh, kw, in, out) of
`layers.conv_transpose`; BatchNorm weight / bias / running_mean /
running_var -> params scale / bias and batch_stats mean / var.

`weights.import_authors` writes a run directory from such a file.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
from typing import Any, Mapping

from absl import logging
import flax.linen as nn
import ml_collections
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from fgtbt_jax import models
from fgtbt_jax.weights import pth
from fgtbt_jax.weights.imagenet import to_flax_layout

# Where the released files keep their tensors.
STATE_DICT_PATH = ("model", "sd")
# AuthorsCheckpoint.structure: the released wrapper, or a bare torch.save(state_dict).
RELEASE, BARE_STATE_DICT = "release", "state_dict"
# What torch.nn.DataParallel and DistributedDataParallel put before every name
# (nested wrappers repeat it); stripped when every key carries it.
WRAPPER_PREFIX = "module."
DROPPED_LAYERS = ("encoder.decode_head.conv_seg",)
BATCHES_TRACKED = "num_batches_tracked"

_STEM = (("norm_in", "bn1"), ("conv_in", "conv1"), ("norm_mid", "bn2"), ("proj", "proj"),
         ("norm_out", "bn3"), ("conv_out", "conv3"), ("norm", "norm"))
_BLOCK = (("norm1", "norm1"), ("attention/q", "attn.q"), ("attention/kv", "attn.kv"),
          ("attention/proj", "attn.proj"), ("attention/sr", "attn.sr"),
          ("attention/sr_norm", "attn.norm"), ("norm2", "norm2"), ("mlp/fc1", "mlp.fc1"),
          ("mlp/dwconv", "mlp.dwconv.dwconv"), ("mlp/fc2", "mlp.fc2"))
_BOTTLENECK = (("norm1", "bn1"), ("conv1", "conv1"), ("norm2", "bn2"), ("conv2", "conv2"),
               ("norm3", "bn3"), ("conv3", "conv3"), ("shortcut_norm", "downsample.0"),
               ("shortcut", "downsample.2"))
_BACKBONE = "encoder.backbone."
_PROMPT = _BACKBONE + "prompt_generator."
_HEAD = "encoder.decode_head."

# (project layer, authors module, kernel layout). {i}: the project's stage or
# decoder index, {I} = i + 1 the authors'; {j}: a block. Layouts: "linear" and
# "conv" as `to_flax_layout`, "conv1x1_dense" a 1x1 convolution the project
# applies as a dense layer, "conv_transpose" a ConvTranspose2d.
_LAYERS: tuple[tuple[str, str, str], ...] = (
    *((f"encoder/stage_{{i}}/patch_embed/{ours}", f"{_BACKBONE}patch_embed{{I}}.{theirs}", "conv")
      for ours, theirs in _STEM),
    *((f"encoder/stage_{{i}}/block_{{j}}/{ours}", f"{_BACKBONE}block{{I}}.{{j}}.{theirs}", "linear")
      for ours, theirs in _BLOCK),
    ("encoder/stage_{i}/norm", _BACKBONE + "norm{I}", "linear"),
    *((f"encoder/stage_{{i}}/fgsa/refine/{ours}", f"{_PROMPT}handcrafted_generator{{I}}.{theirs}",
       "conv") for ours, theirs in _STEM),
    ("encoder/stage_{i}/fgsa/image_proj", _PROMPT + "embedding_generator{I}", "linear"),
    ("encoder/stage_{i}/fgsa/reduce_{j}", _PROMPT + "lightweight_mlp{I}_{j}.0", "linear"),
    ("encoder/stage_{i}/fgsa/expand", _PROMPT + "shared_mlp{I}", "linear"),
    ("encoder/stage_{i}/fgsa/norm", _PROMPT + "bn{I}", "linear"),
    ("encoder/stage_{i}/fgsa/conv", _PROMPT + "conv{I}", "conv1x1_dense"),
    ("encoder/stage_{i}/fgsa/channel_attention/squeeze",
     _PROMPT + "shared_csam{I}.semantic_att.linear.0", "linear"),
    ("encoder/stage_{i}/fgsa/channel_attention/excite",
     _PROMPT + "shared_csam{I}.semantic_att.linear.2", "linear"),
    ("decoder/embed_{i}", _HEAD + "linear_c{I}.proj", "linear"),
    ("decoder/fuse", _HEAD + "linear_fuse.conv", "conv"),
    ("decoder/fuse_norm", _HEAD + "linear_fuse.bn", "conv"),
    ("decoder/project", _HEAD + "linear_pred", "conv"),
    *((f"decoder/conv_block/{ours}", f"{_HEAD}conv1.{theirs}", "conv")
      for ours, theirs in _BOTTLENECK),
    ("decoder/upsample", _HEAD + "upSample.upsample", "conv_transpose"),
    ("decoder/heatmap", _HEAD + "conv2", "conv"),
)

# Flax leaf -> PyTorch tensor name, by layer kind.
_BATCH_NORM_LEAVES = {("params", "scale"): "weight", ("params", "bias"): "bias",
                      ("batch_stats", "mean"): "running_mean",
                      ("batch_stats", "var"): "running_var"}
_LAYER_NORM_LEAVES = {("params", "scale"): "weight", ("params", "bias"): "bias"}
_WEIGHT_LEAVES = {("params", "kernel"): "weight", ("params", "bias"): "bias"}


class AuthorsCheckpointError(pth.ArchiveError):
  """A file that is not a usable authors' checkpoint; the message starts with `where`.

  Attributes:
    where: the file, or "file:key" for one entry of its state dict.
    reason: what is wrong.
    report: the `LoadReport` when the state dict did not fit the model.
  """

  def __init__(self, where: str, reason: str, report: "LoadReport | None" = None):
    super().__init__(where, reason)
    self.report = report


@dataclasses.dataclass
class AuthorsCheckpoint:
  """What `read_checkpoint` returns.

  Attributes:
    state_dict: tensor name -> numpy array (the EMA model).
    epoch: the file's "epoch" entry (None when absent, and in a bare state dict).
    args: the model's config (the pickled yacs CfgNode) as nested dicts (None
      in a bare state dict).
    structure: `RELEASE` (the released wrapper) or `BARE_STATE_DICT`.
  """

  state_dict: dict[str, np.ndarray]
  epoch: int | None
  args: Any
  structure: str = RELEASE


def _find_state_dict(content: Any, where: str) -> tuple[Mapping, str]:
  """(the state dict, `RELEASE` or `BARE_STATE_DICT`) of an unpickled file.

  Raises:
    AuthorsCheckpointError: neither the released structure nor a non-empty
      mapping of names to tensors; the message says what the file holds.
  """
  model = content.get("model") if isinstance(content, Mapping) else None
  state = model.get("sd") if isinstance(model, Mapping) else None
  if isinstance(state, Mapping):
    return state, RELEASE
  not_tensors = ([name for name, value in content.items() if not isinstance(value, pth.StoredTensor)]
                 if isinstance(content, Mapping) else [])
  if isinstance(content, Mapping) and content and not not_tensors:
    return content, BARE_STATE_DICT
  if not isinstance(content, Mapping):
    found = f"a {type(content).__name__}"
  elif not content:
    found = "an empty dict"
  else:
    first = not_tensors[0]
    found = (f"a dict with keys {sorted(map(str, content))[:8]} ({first!r}: "
             f"{type(content[first]).__name__}, not a tensor)")
  raise AuthorsCheckpointError(
      where, "not an FGTBT authors' checkpoint: expected the release's "
      "{'model': {'sd': <state dict>, ...}, 'epoch': ...} or a bare torch.save(state_dict) "
      f"of names and tensors, found {found}")


def read_checkpoint(path: str | os.PathLike) -> AuthorsCheckpoint:
  """Reads an authors' checkpoint without torch (see the module docstring).

  Raises:
    FileNotFoundError: no such file; IsADirectoryError: a folder.
    AuthorsCheckpointError: not a torch.save zip archive, truncated or
      damaged, a pickled global other than tensors, storages and containers,
      or neither the released `{"model": {"sd": ...}, ...}` structure nor a
      bare state dict (a mapping of names to tensors).
  """
  path = pth._checked_file(path)  # pylint: disable=protected-access
  try:
    with pth.Archive(path) as archive:
      content = archive.unpickle()
      state, structure = _find_state_dict(content, str(path))
      state_dict = {}
      for name, tensor in state.items():
        if not isinstance(tensor, pth.StoredTensor):
          raise AuthorsCheckpointError(f"{path}:{name}",
                                       f"not a tensor but a {type(tensor).__name__}")
        state_dict[str(name)] = archive.tensor(tensor, str(name))
  except AuthorsCheckpointError:
    raise
  except pth.ArchiveError as e:
    raise AuthorsCheckpointError(e.where, e.reason) from None
  if structure == BARE_STATE_DICT:
    return AuthorsCheckpoint(state_dict, None, None, BARE_STATE_DICT)
  epoch = content.get("epoch")
  return AuthorsCheckpoint(state_dict, int(epoch) if isinstance(epoch, int) else None,
                           content["model"].get("args"), RELEASE)


# -- the name map ------------------------------------------------------------------------


def _template_regex(template: str) -> re.Pattern:
  pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)")
  return re.compile(pattern)


_LAYER_PATTERNS = tuple((_template_regex(ours), theirs, layout) for ours, theirs, layout in _LAYERS)


def authors_layer(layer: str) -> tuple[str, str] | None:
  """(authors' module name, kernel layout) of a project layer path, or None.

  E.g. "encoder/stage_0/fgsa/reduce_2" -> ("encoder.backbone.prompt_generator.lightweight_mlp1_2.0",
  "linear").
  """
  for pattern, theirs, layout in _LAYER_PATTERNS:
    match = pattern.fullmatch(layer)
    if match:
      fields = match.groupdict()
      index = {"I": int(fields["i"]) + 1} if "i" in fields else {}
      return theirs.format(j=fields.get("j"), **index), layout
  return None


def _torch_shape(shape: tuple[int, ...], leaf: str, layout: str) -> tuple[int, ...]:
  """The PyTorch shape of a Flax leaf of this shape (the inverse of `_to_flax`)."""
  if leaf != "kernel":
    return shape
  if layout == "conv1x1_dense":
    return (shape[1], shape[0], 1, 1)
  if len(shape) == 2:
    return (shape[1], shape[0])
  if layout == "conv_transpose":
    return (shape[2], shape[3], shape[0], shape[1])
  return (shape[3], shape[2], shape[0], shape[1])


def _to_flax(array: np.ndarray, leaf: str, layout: str) -> np.ndarray:
  """A PyTorch tensor in the layout of the project's Flax leaf."""
  if leaf == "kernel" and layout == "conv1x1_dense":
    return array[:, :, 0, 0].T
  if leaf == "kernel" and layout == "conv_transpose":
    # layers.conv_transpose: the flipped kernel of PyTorch's ConvTranspose2d.
    return array[:, :, ::-1, ::-1].transpose(2, 3, 0, 1)
  return to_flax_layout(array, leaf)


@dataclasses.dataclass(frozen=True)
class MappedTensor:
  """One model variable and its tensor in the authors' state dict.

  Attributes:
    path: ("params" | "batch_stats", *layer path, leaf) in the project's tree.
    shape: its Flax shape.
    torch_shape: the tensor's shape in the state dict.
    layout: the kernel layout (see `_LAYERS`).
  """

  path: tuple[str, ...]
  shape: tuple[int, ...]
  torch_shape: tuple[int, ...]
  layout: str


def _check_model_config(model_config: ml_collections.ConfigDict) -> None:
  wanted = {"patch_embed": "conv_stem", "fgsa": True, "fgsa_compat": "authors"}
  wrong = {k: model_config[k] for k, v in wanted.items() if model_config[k] != v}
  if wrong:
    raise ValueError(f"the authors' weights need a model with {wanted}; this one has {wrong}")


def name_map(model_config: ml_collections.ConfigDict) -> tuple[dict[str, MappedTensor], list[str]]:
  """The authors' tensor names of a model's variables, and the names dropped on import.

  Args:
    model_config: a `models.model_config(...)` with the conv-stem patch
      embedding, FGSA on and `fgsa_compat="authors"`.

  Returns:
    ({authors' name: MappedTensor} for every variable of the model, in the
    order of its variable tree; [the BatchNorm counters and conv_seg tensors
    of a released file]).
  """
  _check_model_config(model_config)
  abstract = nn.meta.unbox(models.abstract_variables(models.build_model(model_config), 64))
  layers: dict[str, dict[tuple[str, str], tuple[int, ...]]] = {}
  for path, leaf in flatten_dict(abstract).items():
    collection, *layer, name = path
    layers.setdefault("/".join(layer), {})[(collection, name)] = tuple(leaf.shape)
  mapped, dropped = {}, []
  for layer, leaves in layers.items():
    found = authors_layer(layer)
    if found is None:
      raise ValueError(f"model layer {layer} has no counterpart in the authors' checkpoint")
    module, layout = found
    if ("batch_stats", "mean") in leaves:
      names, dropped = _BATCH_NORM_LEAVES, dropped + [f"{module}.{BATCHES_TRACKED}"]
    elif ("params", "scale") in leaves:
      names = _LAYER_NORM_LEAVES
    else:
      names = _WEIGHT_LEAVES
    for (collection, leaf), shape in leaves.items():
      mapped[f"{module}.{names[(collection, leaf)]}"] = MappedTensor(
          (collection, *layer.split("/"), leaf), shape, _torch_shape(shape, leaf, layout), layout)
  dropped += [f"{layer}.{leaf}" for layer in DROPPED_LAYERS for leaf in ("weight", "bias")]
  return mapped, dropped


def authors_state_dict_shapes(
    model_config: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
  """{name: PyTorch shape} of the authors' state dict for this model (their file's order aside).

  The paper network gives the 929 entries of the released files; conv_seg's
  shape is (num_points, upsample_channels, 1, 1).
  """
  mapped, dropped = name_map(model_config)
  shapes = {name: tensor.torch_shape for name, tensor in mapped.items()}
  for name in dropped:
    if name.endswith(BATCHES_TRACKED):
      shapes[name] = ()
    else:
      seg = (model_config.num_points, model_config.upsample_channels, 1, 1)
      shapes[name] = seg if name.endswith("weight") else seg[:1]
  return shapes


# -- the state dict -> the model's variables ------------------------------------------


@dataclasses.dataclass
class LoadReport:
  """What a conversion found, tensor by tensor.

  Attributes:
    loaded: authors' name -> model variable ("params/encoder/stage_0/...").
    dropped: names in the file that are not used (BatchNorm counters, conv_seg).
    missing: names the model needs that the file lacks.
    unexpected: names in the file that are neither loaded nor dropped.
    mismatched: name -> (shape in the file, shape the model needs).
    batches_tracked: num_batches_tracked value -> how many BatchNorms had it.
    prefix: what was stripped from every name of the file (`WRAPPER_PREFIX`,
      once per wrapper; "" when none); the names above are without it.
    converted: dtype name -> how many loaded tensors were converted from it
      to float32 (empty when all were float32).
    hint: when the names do not fit, the prefix that would make them fit
      (see `_prefix_hint`); "" when none would.
  """

  loaded: dict[str, str] = dataclasses.field(default_factory=dict)
  dropped: list[str] = dataclasses.field(default_factory=list)
  missing: list[str] = dataclasses.field(default_factory=list)
  unexpected: list[str] = dataclasses.field(default_factory=list)
  mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = dataclasses.field(
      default_factory=dict)
  batches_tracked: dict[int, int] = dataclasses.field(default_factory=dict)
  prefix: str = ""
  converted: dict[str, int] = dataclasses.field(default_factory=dict)
  hint: str = ""

  @property
  def ok(self) -> bool:
    return not (self.missing or self.unexpected or self.mismatched)

  def problems(self) -> list[tuple[str, str]]:
    """(name, what is wrong) for every tensor that keeps the file from loading."""
    return ([(n, "missing from the state dict") for n in self.missing]
            + [(n, "not a tensor of the model") for n in self.unexpected]
            + [(n, f"shape {f} in the file, the model needs {m}")
               for n, (f, m) in self.mismatched.items()])

  def summary(self, max_lines: int = 20) -> str:
    """A readable multi-line account (long lists cut to `max_lines`)."""
    lines = [f"loaded {len(self.loaded)} tensors, dropped {len(self.dropped)}, "
             f"missing {len(self.missing)}, unexpected {len(self.unexpected)}, "
             f"shape mismatches {len(self.mismatched)}"]
    if self.prefix:
      lines.append(f"names read without their {self.prefix!r} prefix "
                   "(torch.nn.DataParallel / DistributedDataParallel)")
    if self.converted:
      counts = ", ".join(f"{n} {dtype}" for dtype, n in sorted(self.converted.items()))
      lines.append(f"converted to float32: {counts} tensors")
    if self.batches_tracked:
      counts = ", ".join(f"{value} in {n}" for value, n in sorted(self.batches_tracked.items()))
      lines.append(f"num_batches_tracked of the {sum(self.batches_tracked.values())} "
                   f"BatchNorms: {counts} (dropped)")
    if self.hint:
      lines.append(f"hint: {self.hint}")
    layers = sorted({n for n in self.dropped if not n.endswith(BATCHES_TRACKED)})
    if layers:
      lines.append(f"dropped (unused by the model): {', '.join(layers)}")
    for title, names in (("missing", self.missing), ("unexpected", self.unexpected),
                         ("shape mismatches", list(self.mismatched))):
      if not names:
        continue
      lines.append(f"{title}:")
      for name in names[:max_lines]:
        shapes = self.mismatched.get(name)
        lines.append(f"  {name}" + (f": file {shapes[0]}, model {shapes[1]}" if shapes else ""))
      if len(names) > max_lines:
        lines.append(f"  ... and {len(names) - max_lines} more")
    return "\n".join(lines)


def _wrapper_prefix(names: list[str]) -> str:
  """`WRAPPER_PREFIX` as many times as every one of `names` starts with it ("" when not all do)."""
  prefix = ""
  while names and all(name.startswith(prefix + WRAPPER_PREFIX) for name in names):
    prefix += WRAPPER_PREFIX
  return prefix


def _dotted_heads(name: str, names: set[str]) -> list[str]:
  """The prefixes "a.b." of `name` whose removal leaves one of `names`."""
  parts = name.split(".")
  return [".".join(parts[:i]) + "." for i in range(1, len(parts))
          if ".".join(parts[i:]) in names]


def _prefix_hint(report: LoadReport, file_names: list[str], known: set[str],
                 needed: list[str]) -> str:
  """What prefix would make a state dict's names fit the model, in one sentence ("" if none).

  The candidates: prefixes that, stripped from the unexpected names, leave a
  name of the model (`known`: needed or dropped), and prefixes of missing
  names that, added to the file's names, give them. The one under which the
  most needed tensors would be found is named, if it finds more than the
  names as they are.
  """
  present = set(file_names)
  stripped = collections.Counter(p for n in report.unexpected for p in _dotted_heads(n, known))
  added = collections.Counter(p for n in report.missing for p in _dotted_heads(n, present))
  found_now = len(needed) - len(report.missing)
  best, best_found = None, found_now
  for prefix, _ in stripped.most_common(3):
    found = sum(n in present or prefix + n in present for n in needed)
    if found > best_found:
      carrying = sum(n.startswith(prefix) for n in file_names)
      best, best_found = (f"{carrying} of the file's {len(file_names)} keys start with "
                          f"{prefix!r}; without it", "stripped"), found
  for prefix, _ in added.most_common(3):
    found = sum(n in present or (n.startswith(prefix) and n[len(prefix):] in present)
                for n in needed)
    if found > best_found:
      best, best_found = (f"the file's keys lack the prefix {prefix!r}; with it", "added"), found
  if not best:
    return ""
  return (f"{best[0]} {best_found} of the model's {len(needed)} tensors would be found, "
          f"{found_now} are: re-save the state dict with the prefix {best[1]}")


def convert_state_dict(state_dict: Mapping[str, np.ndarray],
                       model_config: ml_collections.ConfigDict,
                       where: str = "state dict") -> tuple[dict, LoadReport]:
  """The authors' state dict as the model's {"params", "batch_stats"} (float32 numpy).

  A `WRAPPER_PREFIX` on every name (DataParallel) is stripped before the
  names are matched (`LoadReport.prefix`); tensors of other dtypes than
  float32 are converted and counted (`LoadReport.converted`).

  Args:
    state_dict: name -> numpy array, as `read_checkpoint` gives it.
    model_config: the target model (conv stem, FGSA on, fgsa_compat "authors").
    where: the file, for error messages.

  Raises:
    AuthorsCheckpointError: missing or unexpected names, or shape
      mismatches; the message names the first (and counts the others), or,
      when a prefix would make the names fit, says so in one line
      (`LoadReport.hint`); the error's `report` lists them all.
  """
  mapped, dropped = name_map(model_config)
  dropped_names = set(dropped)
  report = LoadReport(prefix=_wrapper_prefix(list(state_dict)))
  if report.prefix:
    logging.info("%s: every name starts with %r (DataParallel); read without it", where,
                 report.prefix)
    state_dict = {name[len(report.prefix):]: array for name, array in state_dict.items()}
  flat = {}
  for name, array in state_dict.items():
    array = np.asarray(array)
    if name in dropped_names:
      report.dropped.append(name)
      if name.endswith(BATCHES_TRACKED) and array.size == 1:
        value = int(array.reshape(()))
        report.batches_tracked[value] = report.batches_tracked.get(value, 0) + 1
    elif name not in mapped:
      report.unexpected.append(name)
    elif tuple(array.shape) != mapped[name].torch_shape:
      report.mismatched[name] = (tuple(array.shape), mapped[name].torch_shape)
    else:
      tensor = mapped[name]
      if array.dtype != np.float32:
        report.converted[array.dtype.name] = report.converted.get(array.dtype.name, 0) + 1
      flat[tensor.path] = np.ascontiguousarray(
          _to_flax(array, tensor.path[-1], tensor.layout), np.float32)
      report.loaded[name] = "/".join(tensor.path)
  report.missing = [name for name in mapped if name not in state_dict]
  problems = report.problems()
  if problems:
    report.hint = _prefix_hint(report, list(state_dict), set(mapped) | dropped_names,
                               list(mapped))
    if report.hint:
      raise AuthorsCheckpointError(
          where, f"the state dict's names do not fit the model ({len(report.missing)} of its "
          f"{len(mapped)} tensors missing, {len(report.unexpected)} unexpected names): "
          f"{report.hint}", report)
    name, reason = problems[0]
    others = len(problems) - 1
    more = (f" (and {others} more problem{'s' if others > 1 else ''}: see the load report)"
            if others else "")
    raise AuthorsCheckpointError(f"{where}:{report.prefix}{name}", reason + more, report)
  if report.converted:
    logging.info("%s: converted to float32: %s", where, report.converted)
  return unflatten_dict(flat), report
