"""Imports point down: every module sits in a layer and imports only lower layers.

Read from the source with `ast`, so imports inside functions count too. A
wing (a subpackage of `fgtbt_jax`: `models`, `data`, `deploy`, `weights`) is one unit of the
table: imports inside it are free, and it sits in one layer as a whole, so
no import loop runs through it. The layers (lowest first) are the project's
architecture:

  facts          error types, metric writer
  protocol       the unified protocol, crop convention, image loading, heatmap
                 maths
  maths / model  metrics, losses, the network (the `models` wing)
  data           the `data` wing: the dataset registry (subsets, counts,
                 builder names, paper numbers), readers, synthetic stand-ins,
                 conversion, the grain pipeline, data preparation (it uses
                 the layers above only); decoding error
  run directory  the workdir's lock, its config.json (the upgrade of older ones,
                 the command line's overrides) and which checkpoint to use
  devices / run  mesh and batches, Orbax checkpoints, the report (pure
                 functions of per-image arrays)
  core           the one predict function and EMA restore; the train state
  wings          the `deploy` wing: face detectors and their box calibration,
                 video tracking and smoothing, overlays, `Predictor`, the
                 predict command and its config checks, StableHLO export;
                 the `weights` wing: `.pth` files read without torch, the
                 ImageNet encoder import, the authors' checkpoint import
  users          studies; config validation (the predict section's checks
                 are the deploy wing's)
  entry          the evaluation pass and eval-only mode
  loop           the training loop
  tools          built on the training loop's step: the ahead-of-time compile
                 for a device topology
  commands       the `commands` wing: every command line (train / eval /
                 predict of run.py, the data commands, export, the weight
                 imports, calibration, aot, decoding error); no library
                 module below defines an argument parser
  shims          `data_pipelines.convert|synthetic|visualize`: the data
                 commands under their design-card names

Packages: the top-level packages (`fgtbt_jax`, `data_pipelines`) import each
other in no loop: `data_pipelines` names three commands of
`fgtbt_jax.commands`, and no `fgtbt_jax` module imports it.
"""

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("fgtbt_jax", "data_pipelines")

LAYERS: tuple[tuple[str, ...], ...] = (
    ("fgtbt_jax.errors", "fgtbt_jax.metric_writer"),
    ("fgtbt_jax.landmarks", "fgtbt_jax.crop", "fgtbt_jax.images", "fgtbt_jax.heatmaps"),
    ("fgtbt_jax.metrics", "fgtbt_jax.losses", "fgtbt_jax.models"),
    ("fgtbt_jax.data", "fgtbt_jax.decoding_error"),
    ("fgtbt_jax.rundir",),
    ("fgtbt_jax.sharding", "fgtbt_jax.checkpointing", "fgtbt_jax.report"),
    ("fgtbt_jax.inference", "fgtbt_jax.state"),
    ("fgtbt_jax.deploy", "fgtbt_jax.weights"),
    ("fgtbt_jax.studies",),
    ("fgtbt_jax.validation",),
    ("fgtbt_jax.evaluate",),
    ("fgtbt_jax.train",),
    ("fgtbt_jax.aot",),
    ("fgtbt_jax.commands",),
    ("data_pipelines.convert", "data_pipelines.synthetic", "data_pipelines.visualize"),
)
# Subpackages whose modules form one unit of the table (imports inside them are free):
# every wing of fgtbt_jax is one (test_every_wing_is_one_unit).
UNITS = ("fgtbt_jax.models", "fgtbt_jax.data", "fgtbt_jax.deploy", "fgtbt_jax.weights",
         "fgtbt_jax.commands")
ENTRY_LEVEL = {"fgtbt_jax.evaluate", "fgtbt_jax.train"}
# Loops between top-level packages that are known and named (a pair, the reason).
KNOWN_PACKAGE_LOOPS = {
    ("data_pipelines", "fgtbt_jax"): "the readers and pipeline use the protocol's leaf "
    "facts and evaluation and training use the pipeline, until fgtbt_jax/data takes them",
}


def _modules() -> dict[str, pathlib.Path]:
  found = {}
  for package in PACKAGES:
    for path in sorted((REPO / package).rglob("*.py")):
      parts = path.relative_to(REPO).with_suffix("").parts
      name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
      found[name] = path
  return found


MODULES = _modules()


def _unit(module: str) -> str:
  for unit in UNITS:
    if module == unit or module.startswith(unit + "."):
      return unit
  return module


def project_imports(module: str) -> set[str]:
  """The project modules `module` imports anywhere in its file (units collapsed)."""
  path = MODULES[module]
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  imported = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      imported.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.split(".")[:len(package.split(".")) - node.level + 1]
        source = ".".join(base + ([node.module] if node.module else []))
      else:
        source = node.module
      submodules = [f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in MODULES]
      imported.update(submodules or [source])
  own = _unit(module)
  return {_unit(m) for m in imported
          if m.split(".")[0] in PACKAGES and m in MODULES and _unit(m) != own}


RANK = {name: rank for rank, layer in enumerate(LAYERS) for name in layer}


def test_every_module_has_a_layer():
  missing = sorted({_unit(m) for m in MODULES} - set(RANK) - set(PACKAGES))
  assert not missing, f"add these modules to a layer of LAYERS: {missing}"


@pytest.mark.parametrize("module", sorted({_unit(m) for m in MODULES} - set(PACKAGES)))
def test_imports_point_down(module):
  upward = sorted(m for m in project_imports(module) if m not in PACKAGES
                  and RANK[m] >= RANK[module])
  assert not upward, f"{module} (layer {RANK[module]}) imports {upward}, not below it"


def test_data_pipelines_is_the_command_layer_over_fgtbt_jax():
  # data_pipelines holds commands: fgtbt_jax imports none of it.
  for module in MODULES:
    if module.startswith("fgtbt_jax"):
      reached = {m for m in project_imports(module) if m.startswith("data_pipelines")}
      assert not reached, (module, sorted(reached))


def test_the_scan_sees_function_level_imports(tmp_path, monkeypatch):
  # The check is only as good as its scan: an import inside a function counts.
  fake = tmp_path / "fgtbt_jax" / "fake.py"
  fake.parent.mkdir()
  fake.write_text("def f():\n  from fgtbt_jax import train\n  from . import evaluate\n")
  monkeypatch.setitem(MODULES, "fgtbt_jax.fake", fake)
  assert project_imports("fgtbt_jax.fake") == {"fgtbt_jax.train", "fgtbt_jax.evaluate"}


def test_every_wing_is_one_unit():
  wings = sorted({".".join(m.split(".")[:2]) for m, path in MODULES.items()
                  if m.startswith("fgtbt_jax.") and (REPO / "fgtbt_jax" / m.split(".")[1]).is_dir()})
  assert wings and set(wings) <= set(UNITS), f"add these wings to UNITS: {set(wings) - set(UNITS)}"


def _package_loops() -> set[tuple[str, ...]]:
  """Pairs of top-level packages that import each other (their loops, as sorted pairs)."""
  reaches = {package: set() for package in PACKAGES}
  for module in MODULES:
    own = module.split(".")[0]
    reaches[own] |= {m.split(".")[0] for m in project_imports(module)} - {own}
  return {tuple(sorted((a, b))) for a in PACKAGES for b in reaches[a] if a in reaches[b]}


def test_no_package_level_loop():
  assert not _package_loops()


_PARSERS = {("argparse", "ArgumentParser"), ("flags", "FlagValues")}


def _defines_a_parser(path: pathlib.Path) -> list[str]:
  """The argument parsers and flag definitions a file makes (argparse, absl, config_flags)."""
  found = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
      owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
      if (owner, node.func.attr) in _PARSERS or (
          owner in ("flags", "config_flags") and node.func.attr.startswith("DEFINE")):
        found.append(f"{path.name}:{node.lineno} {owner}.{node.func.attr}")
  return found


def test_only_the_commands_wing_parses_command_lines():
  library = [m for m in MODULES if m.startswith("fgtbt_jax") and _unit(m) != "fgtbt_jax.commands"]
  offenders = [hit for m in library for hit in _defines_a_parser(MODULES[m])]
  assert not offenders, f"move these command lines into fgtbt_jax/commands: {offenders}"
  # The scan sees what it looks for.
  assert _defines_a_parser(MODULES["fgtbt_jax.commands.aot"])
  assert _defines_a_parser(MODULES["fgtbt_jax.commands.run"])


def test_the_library_imports_no_config_file():
  # configs/ import fgtbt_jax: the library takes configs as arguments and
  # only the commands read config files.
  for module, path in MODULES.items():
    if module.startswith("fgtbt_jax") and _unit(module) != "fgtbt_jax.commands":
      for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
        assert not any(n.split(".")[0] == "configs" for n in names), (module, node.lineno)
