"""Import ImageNet-pretrained PyTorch MiT / SegFormer encoder weights into the FGTBT encoder.

ImageNet-pretrained MiT encoders circulate under three namings, all accepted:

| part | NVlabs `mit_b*.pth` | Hugging Face hub (classic) | transformers >= 5 |
|---|---|---|---|
| patch embed | `patch_embed{i}.proj/.norm` | `encoder.patch_embeddings.{i}.proj/.layer_norm` | `stages.{i}.patch_embeddings.proj/.layer_norm` |
| block norms | `block{i}.{j}.norm1/2` | `encoder.block.{i}.{j}.layer_norm_1/_2` | `stages.{i}.blocks.{j}.layernorm_before/_after` |
| q, k, v | `attn.q`, `attn.kv` (k first) | `attention.self.query/key/value` | `attention.q_proj/k_proj/v_proj` |
| out proj | `attn.proj` | `attention.output.dense` | `attention.o_proj` |
| reduction | `attn.sr`, `attn.norm` | `attention.self.sr/.layer_norm` | `attention.sequence_reduction.sequence_reduction/.layer_norm` |
| Mix-FFN | `mlp.fc1/dwconv.dwconv/fc2` | `mlp.dense1/dwconv.dwconv/dense2` | `mlp.fc1/dwconv.dwconv/fc2` |
| stage norm | `norm{i}` | `encoder.layer_norm.{i}` | `stages.{i}.layer_norm` |

(NVlabs stages count from 1, the others from 0.) Wrapper prefixes such as
`segformer.`, `module.` or `backbone.` are ignored. Tensors are laid out for
Flax: linear (out, in) -> (in, out); convolution (out, in, kh, kw) ->
(kh, kw, in, out), which also turns a depthwise (C, 1, 3, 3) kernel into the
grouped (3, 3, 1, C) one; separate k and v projections are fused into the
model's kv layer (k first).

The load is non-strict, like PyTorch's `load_state_dict(strict=False)` with
shape filtering: every tensor that names a model parameter of the same shape
is loaded; the rest is reported as skipped (unknown name, shape mismatch, e.g.
plain patch-embedding convolutions against the conv-stem model) and the model
parameters nothing loaded into are reported as missing (the decoder and FGSA
always are).

Files: `.safetensors` (read with numpy) and `torch.save` files (`.pth`, `.pt`,
`.bin`, read without torch by `weights.pth`).

CLI:
  fgtbt import-imagenet --input mit_b1.pth --variant b1 \\
      --patch-embed plain --output params.msgpack
writes the model's full 'params' collection (fresh seeded init where nothing
was loaded) with `flax.serialization.msgpack_serialize`; read it back with
`flax.serialization.msgpack_restore(open(path, "rb").read())`.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from fgtbt_jax import models
from fgtbt_jax.weights import pth

# Leading module names that wrap an encoder in training code or other models.
_WRAPPER_PREFIXES = ("module.", "model.", "backbone.", "segformer.")

# Per-block parameter names: {naming: {source layer: model layer}}.
_BLOCK_LAYERS = {
    "nvlabs": {
        "norm1": "norm1", "norm2": "norm2",
        "attn.q": "attention/q", "attn.kv": "attention/kv", "attn.proj": "attention/proj",
        "attn.sr": "attention/sr", "attn.norm": "attention/sr_norm",
        "mlp.fc1": "mlp/fc1", "mlp.dwconv.dwconv": "mlp/dwconv", "mlp.fc2": "mlp/fc2",
    },
    "hf_classic": {
        "layer_norm_1": "norm1", "layer_norm_2": "norm2",
        "attention.self.query": "attention/q", "attention.self.key": "attention/k",
        "attention.self.value": "attention/v", "attention.output.dense": "attention/proj",
        "attention.self.sr": "attention/sr", "attention.self.layer_norm": "attention/sr_norm",
        "mlp.dense1": "mlp/fc1", "mlp.dwconv.dwconv": "mlp/dwconv", "mlp.dense2": "mlp/fc2",
    },
    "transformers": {
        "layernorm_before": "norm1", "layernorm_after": "norm2",
        "attention.q_proj": "attention/q", "attention.k_proj": "attention/k",
        "attention.v_proj": "attention/v", "attention.o_proj": "attention/proj",
        "attention.sequence_reduction.sequence_reduction": "attention/sr",
        "attention.sequence_reduction.layer_norm": "attention/sr_norm",
        "mlp.fc1": "mlp/fc1", "mlp.dwconv.dwconv": "mlp/dwconv", "mlp.fc2": "mlp/fc2",
    },
}

# (regex over the un-prefixed name, naming, stage index base, layer template)
# The last group of every pattern is the tensor name ("weight" or "bias").
_PATTERNS = (
    (r"patch_embed(\d)\.(proj|norm)\.(\w+)", "nvlabs", 1, "patch_embed"),
    (r"block(\d)\.(\d+)\.(.+)\.(\w+)", "nvlabs", 1, "block"),
    (r"norm(\d)\.(\w+)", "nvlabs", 1, "stage_norm"),
    (r"encoder\.patch_embeddings\.(\d)\.(proj|layer_norm)\.(\w+)", "hf_classic", 0, "patch_embed"),
    (r"encoder\.block\.(\d)\.(\d+)\.(.+)\.(\w+)", "hf_classic", 0, "block"),
    (r"encoder\.layer_norm\.(\d)\.(\w+)", "hf_classic", 0, "stage_norm"),
    (r"stages\.(\d)\.patch_embeddings\.(proj|layer_norm)\.(\w+)", "transformers", 0, "patch_embed"),
    (r"stages\.(\d)\.blocks\.(\d+)\.(.+)\.(\w+)", "transformers", 0, "block"),
    (r"stages\.(\d)\.layer_norm\.(\w+)", "transformers", 0, "stage_norm"),
)

_NORM_LAYERS = ("norm1", "norm2", "sr_norm", "norm")


@dataclasses.dataclass
class ConversionReport:
  """What a conversion did, tensor by tensor.

  Attributes:
    loaded: source name -> model parameter path ("encoder/stage_0/...").
    skipped: source name -> reason (unknown name, shape mismatch, ...).
    missing: model parameter paths that nothing was loaded into.
  """

  loaded: dict[str, str] = dataclasses.field(default_factory=dict)
  skipped: dict[str, str] = dataclasses.field(default_factory=dict)
  missing: list[str] = dataclasses.field(default_factory=list)

  def summary(self, max_lines: int = 20) -> str:
    """A readable multi-line account (long lists are cut to `max_lines`)."""
    lines = [f"loaded {len(self.loaded)} tensors, skipped {len(self.skipped)}, "
             f"{len(self.missing)} model parameters not in the file"]
    if self.skipped:
      lines.append("skipped:")
      lines += [f"  {name}: {why}" for name, why in list(self.skipped.items())[:max_lines]]
      if len(self.skipped) > max_lines:
        lines.append(f"  ... and {len(self.skipped) - max_lines} more")
    by_part: dict[str, list[str]] = {}
    for path in self.missing:
      part = "fgsa" if "/fgsa/" in path else path.split("/")[0]
      by_part.setdefault(part, []).append(path)
    if by_part:
      lines.append("missing (left at initialisation):")
      for part, paths in sorted(by_part.items()):
        lines.append(f"  {part}: {len(paths)} tensors")
        if part == "encoder":
          lines += [f"    {p}" for p in paths[:max_lines]]
          if len(paths) > max_lines:
            lines.append(f"    ... and {len(paths) - max_lines} more")
    return "\n".join(lines)


def _strip_wrappers(name: str) -> str:
  changed = True
  while changed:
    changed = False
    for prefix in _WRAPPER_PREFIXES:
      if name.startswith(prefix):
        name, changed = name[len(prefix):], True
  return name


def _tensor_leaf(layer: str, tensor: str) -> str | None:
  """Flax leaf name of a PyTorch tensor of `layer` ("weight"/"bias")."""
  if tensor == "weight":
    return "scale" if layer.rsplit("/", 1)[-1] in _NORM_LAYERS else "kernel"
  if tensor == "bias":
    return "bias"
  return None


def model_path(name: str) -> str | None:
  """The model parameter path ("encoder/stage_i/...") a source name maps to.

  k and v projections map to ".../attention/k/..." and ".../attention/v/...",
  which `mit_from_torch` fuses into ".../attention/kv/...". Returns None for
  names outside the MiT encoder.
  """
  stripped = _strip_wrappers(name)
  for pattern, naming, base, kind in _PATTERNS:
    match = re.fullmatch(pattern, stripped)
    if not match:
      continue
    groups = match.groups()
    index = int(groups[0]) - base
    if not 0 <= index < 4:
      return None
    stage = f"encoder/stage_{index}"
    if kind == "patch_embed":
      layer = f"{stage}/patch_embed/{'proj' if groups[1] == 'proj' else 'norm'}"
    elif kind == "stage_norm":
      layer = f"{stage}/norm"
    else:
      inner = _BLOCK_LAYERS[naming].get(groups[2])
      if inner is None:
        return None
      layer = f"{stage}/block_{groups[1]}/{inner}"
    leaf = _tensor_leaf(layer, groups[-1])
    return None if leaf is None else f"{layer}/{leaf}"
  return None


def to_flax_layout(array: np.ndarray, leaf: str) -> np.ndarray:
  """A PyTorch tensor in the Flax layout of a `leaf` ("kernel", "bias", "scale", ...).

  Kernels: linear (out, in) -> (in, out); convolution (out, in, kh, kw) ->
  (kh, kw, in, out), so a depthwise (C, 1, 3, 3) becomes (3, 3, 1, C). Other
  leaves are returned as they are.
  """
  if leaf == "kernel" and array.ndim == 2:
    return array.T
  if leaf == "kernel" and array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  return array


def _as_numpy(tensor) -> np.ndarray:
  if hasattr(tensor, "detach"):  # torch.Tensor
    tensor = tensor.detach().cpu().float().numpy()
  return np.asarray(tensor, np.float32)


def init_params(model_config: ml_collections.ConfigDict, seed: int = 0) -> Any:
  """A fresh seeded 'params' collection of `build_model(model_config)`."""
  model = models.build_model(model_config)
  images = jnp.zeros((1, 64, 64, 3), jnp.float32)
  init = jax.jit(lambda key: model.init(key, images, train=False)["params"])
  return init(jax.random.key(seed))


def mit_from_torch(state_dict: Mapping[str, Any], model_config: ml_collections.ConfigDict,
                   params: Any = None, seed: int = 0) -> tuple[Any, ConversionReport]:
  """Loads a PyTorch MiT encoder state dict into the model's parameters.

  Args:
    state_dict: name -> tensor (torch tensors or numpy arrays) in any of the
      three namings of the module docstring.
    model_config: the `model_config(...)` of the target model.
    params: the model's 'params' collection to update (boxed in
      `nn.Partitioned` or plain); None: a fresh init with `seed`.
    seed: init seed when `params` is None.

  Returns:
    (params, report): the updated collection, with the same structure and
    boxing as the input (plain arrays after a fresh init are boxed as
    `model.init` boxes them), and a `ConversionReport`.
  """
  if params is None:
    params = init_params(model_config, seed)
  flat = flatten_dict(params, keep_empty_nodes=False, sep="/")
  targets = {path: nn.meta.unbox(leaf) for path, leaf in flat.items()}
  report = ConversionReport()
  new_values: dict[str, np.ndarray] = {}
  halves: dict[str, dict[str, tuple[str, np.ndarray]]] = {}

  def place(name: str, path: str, value: np.ndarray) -> None:
    if path not in targets:
      report.skipped[name] = f"no model parameter {path} (variant or patch embedding differ)"
    elif tuple(targets[path].shape) != value.shape:
      report.skipped[name] = (
          f"shape mismatch: file {value.shape} (as Flax) vs model {tuple(targets[path].shape)} "
          f"at {path}")
    else:
      new_values[path] = value
      report.loaded[name] = path

  for name, tensor in state_dict.items():
    path = model_path(name)
    if path is None:
      report.skipped[name] = "not a MiT encoder tensor"
      continue
    value = to_flax_layout(_as_numpy(tensor), path.rsplit("/", 1)[1])
    match = re.fullmatch(r"(.*/attention)/([kv])/(kernel|bias)", path)
    if match:
      halves.setdefault(f"{match[1]}/kv/{match[3]}", {})[match[2]] = (name, value)
    else:
      place(name, path, value)

  for path, parts in halves.items():
    if set(parts) != {"k", "v"}:
      for name, _ in parts.values():
        report.skipped[name] = "k and v projections must both be present to fuse kv"
      continue
    (k_name, k), (v_name, v) = parts["k"], parts["v"]
    if k.shape != v.shape:
      report.skipped[k_name] = report.skipped[v_name] = f"k {k.shape} and v {v.shape} differ"
      continue
    place(f"{k_name} + {v_name}", path, np.concatenate([k, v], axis=-1))

  report.missing = sorted(p for p in targets if p not in new_values)
  updated = {}
  for path, leaf in flat.items():
    if path in new_values:
      value = jnp.asarray(new_values[path], nn.meta.unbox(leaf).dtype)
      leaf = leaf.replace_boxed(value) if isinstance(leaf, nn.meta.AxisMetadata) else value
    updated[path] = leaf
  return unflatten_dict(updated, sep="/"), report


def load_state_dict(path: str | pathlib.Path) -> dict[str, Any]:
  """Reads a checkpoint: `.safetensors` with numpy, `.pth`/`.pt`/`.bin` with `pth.load`.

  A {"state_dict": ...} or {"model": ...} wrapper (training checkpoints) is
  unwrapped.

  Raises:
    FileNotFoundError: no such file.
    ValueError: unknown extension or no tensors in the file;
      `pth.ArchiveError` (a ValueError): not a readable torch.save archive.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such checkpoint file")
  suffix = path.suffix.lower()
  if suffix == ".safetensors":
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    state = load_file(str(path))
  elif suffix in (".pth", ".pt", ".bin"):
    state = pth.load(path)
  else:
    raise ValueError(f"{path}: unknown checkpoint type {suffix!r}; "
                     "expected .safetensors, .pth, .pt or .bin")
  for key in ("state_dict", "model"):
    if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
      state = state[key]
  if not isinstance(state, Mapping) or not state:
    raise ValueError(f"{path}: no tensors found")
  return dict(state)


if __name__ == "__main__":  # The command moved; say where instead of doing nothing.
  raise SystemExit("this module is a library now; the command is `fgtbt import-imagenet` "
                   "(or `python -m fgtbt_jax.commands import-imagenet`)")
