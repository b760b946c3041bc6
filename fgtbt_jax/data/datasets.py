"""The four benchmark datasets: every fact about each one, in one registry.

`DATASETS` maps each dataset name (in `landmarks.PROTOCOL_NAMES` order, the
dataset id order) to a `DatasetSpec` that holds, beside its landmark
protocol:

* the evaluation subsets, in the order reports list them (the converted
  data's "subsets/<name>" features, the eval batches' "subset/<name>" keys);
* the per-point flags its annotation formats can carry (COFW "occluded",
  AFLW "visible"; the converted data's "point_flags/<name>");
* the TFDS builder name its converted data is stored under;
* the sample counts of the published splits and test subsets (readers warn
  when a read finds other numbers);
* the FGTBT paper's test results (NME and FR in %);
* the annotation formats it can be read from, in detection order (a
  folder of images with one annotation file each last: `FOLDER`).

A user's own dataset (a folder under a benchmark's or its own point scheme)
gets a spec from `get(name)` once its scheme is registered.

A leaf module: it imports nothing from the project but `landmarks` (and,
through it, `errors`), so the data pipelines, training, evaluation and
reports all read the same facts. `get(name)` is case-insensitive and raises
`errors.UnknownProtocolError` for an unknown name.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Mapping

from fgtbt_jax import landmarks

# The annotation formats (`fgtbt_jax.data.readers` implements each).
WFLW_TXT = "wflw_txt"
W300_PTS = "300w_pts"
COFW_MAT = "cofw_mat"
AFLW_MAT = "aflw_mat"
HRNET_CSV = "hrnet_csv"
STAR_TSV = "star_tsv"
# A folder of images with one annotation file each (any point scheme).
FOLDER = "folder"

# The TFDS builder name of a user's own dataset: this prefix and its name.
OWN_BUILDER_PREFIX = "fgtbt_own_"


@dataclasses.dataclass(frozen=True, eq=False)
class DatasetSpec:
  """One benchmark dataset.

  Attributes:
    name: the protocol name ("WFLW", "300W", "COFW", "AFLW").
    protocol: its landmark protocol (`landmarks.get_protocol(name)`).
    builder_name: the TFDS builder name of its converted data.
    subsets: the evaluation subsets of the test split, report order.
    point_flags: the per-point boolean flags its formats can carry.
    expected_counts: {split: published number of samples}.
    expected_subset_counts: {subset: counts seen in the literature} of the
      test split (several where papers disagree).
    paper_results: the FGTBT paper's test results, {subset: {normaliser or
      "fr": value in %}}, subset "full" being the whole test set.
    formats: the annotation formats it can be read from; when a folder holds
      several, the first wins (raw formats before the derived tables).
  """

  name: str
  protocol: landmarks.Protocol
  builder_name: str
  subsets: tuple[str, ...]
  point_flags: tuple[str, ...]
  expected_counts: Mapping[str, int]
  expected_subset_counts: Mapping[str, tuple[int, ...]]
  paper_results: Mapping[str, Mapping[str, float]]
  formats: tuple[str, ...]

  @property
  def dataset_id(self) -> int:
    """Position in `landmarks.PROTOCOL_NAMES` (the id in batches and metrics)."""
    return self.protocol.dataset_id

  @property
  def default_normalizer(self) -> str:
    """The NME normaliser the paper reports for this dataset."""
    return self.protocol.default_normalizer


def _frozen(mapping: Mapping) -> Mapping:
  """A read-only copy, nested mappings included (the specs are shared)."""
  return types.MappingProxyType(
      {k: _frozen(v) if isinstance(v, Mapping) else v for k, v in mapping.items()})


def _spec(name: str, *, builder_name: str, subsets=(), point_flags=(),
          expected_counts, expected_subset_counts=None, paper_results,
          formats) -> DatasetSpec:
  spec = DatasetSpec(
      name=name, protocol=landmarks.get_protocol(name), builder_name=builder_name,
      subsets=tuple(subsets), point_flags=tuple(point_flags),
      expected_counts=_frozen(expected_counts),
      expected_subset_counts=_frozen(expected_subset_counts or {}),
      paper_results=_frozen(paper_results), formats=tuple(formats))
  # The facts must agree with each other: a typo in a subset name would
  # otherwise only show as a missing row in a report.
  for subset in spec.expected_subset_counts:
    if subset not in spec.subsets:
      raise ValueError(f"{name}: expected count of unknown subset {subset!r}")
  for subset in spec.paper_results:
    if subset != "full" and subset not in spec.subsets:
      raise ValueError(f"{name}: paper result of unknown subset {subset!r}")
  return spec


_WFLW_PAPER = {"full": 4.42, "pose": 7.43, "expression": 4.54, "illumination": 4.47,
               "makeup": 4.37, "occlusion": 5.48, "blur": 5.02}

DATASETS: Mapping[str, DatasetSpec] = types.MappingProxyType({s.name: s for s in (
    _spec("WFLW", builder_name="fgtbt_wflw",
          subsets=("pose", "expression", "illumination", "makeup", "occlusion", "blur"),
          expected_counts={"train": 7500, "test": 2500},
          expected_subset_counts={"pose": (326,), "expression": (314,),
                                  "illumination": (698,), "makeup": (206,),
                                  "occlusion": (736,), "blur": (773,)},
          paper_results={k: {"inter_ocular": v} for k, v in _WFLW_PAPER.items()},
          formats=(WFLW_TXT, HRNET_CSV, STAR_TSV, FOLDER)),
    _spec("300W", builder_name="fgtbt_300w",
          subsets=("common", "challenging"),
          expected_counts={"train": 3148, "test": 689},
          expected_subset_counts={"common": (554,), "challenging": (135,)},
          paper_results={"common": {"inter_ocular": 2.71},
                         "challenging": {"inter_ocular": 4.51},
                         "full": {"inter_ocular": 3.06}},
          formats=(W300_PTS, HRNET_CSV, STAR_TSV, FOLDER)),
    _spec("COFW", builder_name="fgtbt_cofw",
          point_flags=("occluded",),
          expected_counts={"train": 1345, "test": 507},
          # FR: the failure rate at NME 0.1.
          paper_results={"full": {"inter_pupil": 4.79, "fr": 0.59}},
          formats=(COFW_MAT, STAR_TSV, FOLDER)),
    _spec("AFLW", builder_name="fgtbt_aflw",
          subsets=("frontal",), point_flags=("visible",),
          expected_counts={"train": 20000, "test": 4386},
          expected_subset_counts={"frontal": (1165, 1314)},
          paper_results={"full": {"box": 1.67}},
          formats=(AFLW_MAT, HRNET_CSV, STAR_TSV, FOLDER)),
)})

if tuple(DATASETS) != landmarks.PROTOCOL_NAMES:
  raise ValueError(f"datasets {tuple(DATASETS)} are not in protocol order "
                   f"{landmarks.PROTOCOL_NAMES}")


def get(name: str) -> DatasetSpec:
  """The dataset called `name` (case-insensitive): a benchmark, or a user's
  own dataset whose point scheme is registered (`landmarks.register_protocol`;
  `fgtbt_jax.data.schemes` does it for converted data). An own dataset has
  no subsets, point flags, published counts or paper results; it is read
  from a folder (`FOLDER`) and stored as `OWN_BUILDER_PREFIX + name.lower()`.

  Raises:
    UnknownProtocolError: (a ValueError) no dataset has that name.
  """
  protocol = landmarks.get_protocol(name)
  if protocol.name in DATASETS:
    return DATASETS[protocol.name]
  return DatasetSpec(
      name=protocol.name, protocol=protocol, builder_name=own_builder_name(protocol.name),
      subsets=(), point_flags=(), expected_counts=_frozen({}),
      expected_subset_counts=_frozen({}), paper_results=_frozen({}), formats=(FOLDER,))


def own_builder_name(name: str) -> str:
  """The TFDS builder (folder) name of a user's own dataset called `name`."""
  return OWN_BUILDER_PREFIX + str(name).lower()


def paper_results() -> dict[str, dict[str, dict[str, float]]]:
  """The FGTBT paper's test results (NME and FR in %) of every dataset.

  {dataset: {subset: {normaliser or "fr": value}}}, subset "full" being the
  whole test set, datasets in `DATASETS` order. 300W and WFLW are
  inter-ocular, COFW inter-pupil (with its FR@0.1), AFLW the face box size.
  A fresh copy: callers may change it.
  """
  return {name: {subset: dict(values) for subset, values in spec.paper_results.items()}
          for name, spec in DATASETS.items()}
