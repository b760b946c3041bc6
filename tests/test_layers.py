"""Imports point down: every module sits in a layer and imports only lower layers.

Read from the source with `ast`, so imports inside functions count too. A
wing (a subpackage of `fgtbt_jax`: `models`, `deploy`, `weights`) is one unit of the
table: imports inside it are free, and it sits in one layer as a whole, so
no import loop runs through it. The layers (lowest first) are the project's
architecture:

  facts          error types, logical axis names, the record type, metric writer
  protocol       the unified protocol, crop convention, image loading, heatmap
                 maths
  registry       the dataset registry (subsets, counts, builder names, paper numbers)
  maths / model  metrics, losses, decoding error, the network (the `models` wing)
  data           readers, synthetic stand-ins, conversion, the grain pipeline,
                 data preparation (they use the three layers above only)
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
  tools          commands built on the training loop's step: the ahead-of-time
                 compile for a device topology

Packages: the graph of the top-level packages (`fgtbt_jax`, `data_pipelines`)
has no loop but the one in KNOWN_PACKAGE_LOOPS, which `fgtbt_jax/data` (#31
item 1, the data wing) removes: until then `data_pipelines` may use only the
leaf facts of `fgtbt_jax` (protocol, registry, crop, image loading, errors),
and only the entry-level modules of `fgtbt_jax` (evaluation, training loop)
use `data_pipelines`.
"""

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("fgtbt_jax", "data_pipelines")

LAYERS: tuple[tuple[str, ...], ...] = (
    ("fgtbt_jax.errors", "data_pipelines.records", "fgtbt_jax.metric_writer"),
    ("fgtbt_jax.landmarks", "fgtbt_jax.crop", "fgtbt_jax.images", "fgtbt_jax.heatmaps"),
    ("fgtbt_jax.datasets",),
    ("fgtbt_jax.metrics", "fgtbt_jax.losses", "fgtbt_jax.models", "data_pipelines.config",
     "data_pipelines.synthetic", "data_pipelines.readers"),
    ("data_pipelines.tfds_builders", "fgtbt_jax.decoding_error"),
    ("data_pipelines.convert", "data_pipelines.pipeline"),
    ("data_pipelines.prepare", "data_pipelines.visualize"),
    ("fgtbt_jax.rundir",),
    ("fgtbt_jax.sharding", "fgtbt_jax.checkpointing", "fgtbt_jax.report"),
    ("fgtbt_jax.inference", "fgtbt_jax.state"),
    ("fgtbt_jax.deploy", "fgtbt_jax.weights"),
    ("fgtbt_jax.studies",),
    ("fgtbt_jax.validation",),
    ("fgtbt_jax.evaluate",),
    ("fgtbt_jax.train",),
    ("fgtbt_jax.aot",),
)
# Subpackages whose modules form one unit of the table (imports inside them are free):
# every wing of fgtbt_jax is one (test_every_wing_is_one_unit).
UNITS = ("fgtbt_jax.models", "fgtbt_jax.deploy", "fgtbt_jax.weights", "data_pipelines.readers")
LEAF_FACTS = {"fgtbt_jax.landmarks", "fgtbt_jax.datasets", "fgtbt_jax.crop", "fgtbt_jax.images",
              "fgtbt_jax.errors"}
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


def test_the_two_packages_cross_only_at_the_leaf_facts_and_the_entry_level():
  for module in MODULES:
    if module.startswith("data_pipelines"):
      reached = {m for m in project_imports(module) if m.startswith("fgtbt_jax")}
      assert reached <= LEAF_FACTS | {"fgtbt_jax"}, (module, sorted(reached - LEAF_FACTS))
    elif _unit(module) not in ENTRY_LEVEL:
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


def test_no_package_level_loop_but_the_known_ones():
  # Exactly the known ones: a new loop fails, and so does a known one that is gone
  # (then it leaves KNOWN_PACKAGE_LOOPS).
  assert _package_loops() == set(KNOWN_PACKAGE_LOOPS)
