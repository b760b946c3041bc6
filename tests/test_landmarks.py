import numpy as np
import pytest

from fgtbt_jax import landmarks as L


def test_protocol_counts_and_coverage():
  assert list(L.PROTOCOLS) == ["WFLW", "300W", "COFW", "AFLW"]
  assert [p.num_landmarks for p in L.PROTOCOLS.values()] == [98, 68, 29, 19]
  union = np.unique(np.concatenate([p.unified_index for p in L.PROTOCOLS.values()]))
  np.testing.assert_array_equal(union, np.arange(124))
  for p in L.PROTOCOLS.values():
    assert p.unified_index.dtype == np.int32
    assert len(set(p.unified_index.tolist())) == p.num_landmarks


def test_occurrence_count_is_number_of_protocols():
  counts = np.zeros(124, int)
  for p in L.PROTOCOLS.values():
    counts[p.unified_index] += 1
  np.testing.assert_array_equal(counts, L.OCCURRENCE_COUNT)
  assert L.OCCURRENCE_COUNT.min() == 1 and L.OCCURRENCE_COUNT.max() == 4
  np.testing.assert_array_equal(L.PROTOCOL_MASKS.sum(0), L.OCCURRENCE_COUNT)
  # The nose tip region shared by all four protocols.
  assert L.OCCURRENCE_COUNT[24] == 4


def test_unified_flip_is_consistent_involution():
  perm = L.UNIFIED_FLIP_PERMUTATION
  np.testing.assert_array_equal(perm[perm], np.arange(124))
  fixed = np.flatnonzero(perm == np.arange(124))
  np.testing.assert_array_equal(fixed, [24, 67, 68, 69, 70, 73, 105, 111, 116, 120])
  for p in L.PROTOCOLS.values():
    fp = p.flip_permutation
    np.testing.assert_array_equal(fp[fp], np.arange(p.num_landmarks))
    # Own flip mapped to unified ids equals the unified flip.
    np.testing.assert_array_equal(p.unified_index[fp], perm[p.unified_index])


def test_flip_mirrors_mean_face():
  face = L.mean_face()
  # The mean face is roughly symmetric: mirrored, permuted points land near
  # the originals (a wrong permutation would swap eyes with jaw points etc.).
  mirrored = L.flip_points(face, width=1.0)
  mirrored[:, 0] += 1.0  # flip_points uses width - 1 - x; here x -> 1 - x
  assert np.abs(mirrored - face).max() < 0.06


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.9, 0.999])
def test_fmb_weights_formula(beta):
  w = L.fmb_weights(beta)
  c = L.OCCURRENCE_COUNT.astype(np.float64)
  expected = np.ones(124) if beta == 0 else (1 - beta) / (1 - beta ** c)
  np.testing.assert_allclose(w, expected, rtol=1e-6)
  assert w.shape == (124,) and w.dtype == np.float32


def test_fmb_weights_limits_and_bad_beta():
  np.testing.assert_array_equal(L.fmb_weights(0.0), np.ones(124, np.float32))
  np.testing.assert_allclose(L.fmb_weights(1 - 1e-9), 1 / L.OCCURRENCE_COUNT, rtol=1e-6)
  # Hand value: C = 4, beta = 0.9 -> 0.1 / (1 - 0.6561) = 0.29078...
  assert L.fmb_weights(0.9)[24] == pytest.approx(0.1 / 0.3439, rel=1e-6)
  for bad in (1.0, -0.1, 1.5, float("nan")):
    with pytest.raises(ValueError, match="beta"):
      L.fmb_weights(bad)


def test_unified_round_trip_and_mask():
  rng = np.random.default_rng(0)
  for p in L.PROTOCOLS.values():
    pts = rng.uniform(0, 100, (3, p.num_landmarks, 2)).astype(np.float32)
    pts[1, 0] = np.nan
    uni, mask = L.to_unified(pts, p.name)
    assert uni.shape == (3, 124, 2) and mask.shape == (3, 124)
    assert mask[0].sum() == p.num_landmarks
    assert not mask[1, p.unified_index[0]]
    np.testing.assert_array_equal(L.from_unified(uni, p.name), pts)


def test_bad_input_errors():
  with pytest.raises(ValueError, match="unknown protocol 'XYZ'"):
    L.get_protocol("XYZ")
  assert L.get_protocol("wflw") is L.PROTOCOLS["WFLW"]
  with pytest.raises(ValueError, match=r"\(\.\.\., 68, 2\)"):
    L.to_unified(np.zeros((98, 2)), "300W")


def test_normalizers():
  assert L.PROTOCOLS["WFLW"].normalizers["inter_ocular"].a == (60,)
  assert L.PROTOCOLS["300W"].normalizers["inter_pupil"].kind == "centroids"
  assert L.PROTOCOLS["COFW"].default_normalizer == "inter_pupil"
  assert L.PROTOCOLS["AFLW"].default_normalizer == "box"


# -- protocol facts read from the asset -------------------------------------------------


def test_unknown_protocol_is_a_value_error_with_a_plain_message():
  from fgtbt_jax.errors import UnknownProtocolError
  with pytest.raises(UnknownProtocolError) as error:
    L.get_protocol("Helen")
  assert isinstance(error.value, ValueError)
  assert str(error.value) == ("unknown protocol 'Helen'; expected one of "
                              "['WFLW', '300W', 'COFW', 'AFLW']")


def test_asset_tables_missing_a_key_name_it():
  import copy
  raw = L._read_asset()
  for path, message in ((("protocols", "300W", "default_normalizer"),
                         "protocols.300W has no 'default_normalizer'"),
                        (("protocols", "AFLW", "nme_box"), "protocols.AFLW has no 'nme_box'"),
                        (("face_parts",), "the top level has no 'face_parts'")):
    broken = copy.deepcopy(raw)
    table = broken
    for key in path[:-1]:
      table = table[key]
    del table[path[-1]]
    with pytest.raises(ValueError, match=f"unified_124.json: {message}"):
      L._load(broken)
  # Without its centroid rule 300W has no inter-pupil normaliser to default to.
  broken = copy.deepcopy(raw)
  del broken["protocols"]["300W"]["nme_inter_pupil_centroids"]
  broken["protocols"]["300W"]["default_normalizer"] = "inter_pupil"
  with pytest.raises(ValueError, match="default_normalizer 'inter_pupil' is not one of"):
    L._load(broken)


def test_normalizers_from_the_asset():
  p = L.PROTOCOLS["300W"].normalizers["inter_pupil"]
  assert (p.a, p.b) == (tuple(range(36, 42)), tuple(range(42, 48)))
  assert list(L.PROTOCOLS["AFLW"].normalizers) == ["inter_pupil", "box"]
  assert [L.PROTOCOLS[n].default_normalizer for n in L.PROTOCOL_NAMES] == [
      "inter_ocular", "inter_ocular", "inter_pupil", "box"]


def test_face_parts_cover_the_unified_points_consistently():
  assert sorted(L.FACE_PARTS) == list(range(124))
  assert set(L.FACE_PARTS.values()) == set(L.PART_NAMES)
  wflw = L.get_protocol("WFLW").unified_index
  assert L.FACE_PARTS[int(wflw[96])] == "right_pupil"
  assert L.FACE_PARTS[int(wflw[97])] == "left_pupil"
  assert L.FACE_PARTS[int(wflw[16])] == "jaw"  # chin
  assert L.FACE_PARTS[int(wflw[54])] == "nose_ridge"  # nose tip
  cofw = L.get_protocol("COFW").unified_index
  assert {L.FACE_PARTS[int(cofw[i])] for i in (18, 19)} == {"nose_base"}
  assert L.FACE_PARTS[int(cofw[16])] == "right_pupil"
  aflw = L.get_protocol("AFLW").unified_index
  assert [L.FACE_PARTS[int(u)] for u in aflw[:6]] == ["right_brow"] * 3 + ["left_brow"] * 3
  assert L.OWN_PART_RANGES["WFLW"][0] == ("jaw", 0, 33)
  # Mirror points belong to mirrored parts.
  for u, part in L.FACE_PARTS.items():
    mirror = L.FACE_PARTS[int(L.UNIFIED_FLIP_PERMUTATION[u])]
    assert mirror == part.replace("right", "@").replace("left", "right").replace("@", "left")


def test_dataset_registry_matches_the_protocols():
  from fgtbt_jax.data import datasets
  assert tuple(datasets.DATASETS) == L.PROTOCOL_NAMES
  for name, spec in datasets.DATASETS.items():
    assert spec.protocol is L.get_protocol(name) and spec.dataset_id == L.PROTOCOL_NAMES.index(name)
    assert spec.builder_name == f"fgtbt_{name.lower()}"
    assert set(spec.expected_subset_counts) <= set(spec.subsets)
    assert set(spec.paper_results) - {"full"} <= set(spec.subsets)
    assert spec.default_normalizer in spec.paper_results["full"]
  assert datasets.get("cofw").point_flags == ("occluded",)
  assert datasets.get("300w").subsets == ("common", "challenging")
  assert datasets.get("AFLW").expected_subset_counts == {"frontal": (1165, 1314)}
  paper = datasets.paper_results()
  assert paper["WFLW"]["pose"] == {"inter_ocular": 7.43}
  assert paper["COFW"] == {"full": {"inter_pupil": 4.79, "fr": 0.59}}
  paper["WFLW"]["pose"]["inter_ocular"] = 0.0  # A copy: the registry keeps its numbers.
  assert datasets.get("WFLW").paper_results["pose"]["inter_ocular"] == 7.43
  with pytest.raises(ValueError, match="unknown protocol 'LFW'"):
    datasets.get("LFW")
