"""The paper's ablation studies as one parameterised config.

  python run.py --config=configs/ablations.py:STUDY --config.data.data_dir=DATA

STUDY is a comma-separated list of key=value settings applied to the paper
config (configs/fgtbt_paper.py); the workdir defaults to
runs/ablations_<STUDY>. The studies of the paper:

  beta=0 | beta=0.3 | beta=0.6 | beta=0.9 | beta=0.999     FMB beta sweep (Table 5)
  balancer=fmb | balancer=uniform | balancer=dwa | balancer=uncertainty
                                                           loss balancers (Table 6)
  frequency=fft | frequency=srm | frequency=wavelet        high-frequency extractors (Table 7)
  fgsa=off                                                 w/o FGSA
  fmb=off                                                  w/o FMB (uniform landmark weights)
  fgsa=off,fmb=off                                         neither (the plain baseline)

The landmark heads of the related work (docs/model.md, "Landmark heads"):

  head=heatmap | head=hih | head=recurrent                 FGTBT heatmaps, Heatmap in
                                                           Heatmap, recurrent refinement

Low-resolution faces (SHT, docs/model.md "Low-resolution faces"):

  lowres=on                                                low-resolution training (faces
                                                           downsampled 2x / 4x / 8x)
  dhln=on                                                  + SHT's dual hallucination
                                                           stream (DHLN; implies lowres=on)
  sht=on                                                   + SHT's pose transfer between two
                                                           views of each face (FPTN; implies
                                                           dhln=on): faces without landmarks
                                                           train too
  input_downsample=F                                       the network on the crop reduced
                                                           F times (SHT-M's small input, e.g.
                                                           base=default,dhln=on,input_downsample=2:
                                                           a 32 px network, 64 px faces
                                                           hallucinated); the input size must
                                                           divide by 32 F

head=hih also decodes with the decimal maps: eval.decoder "hih" where the
base decodes with argmax or quarter, "hih_subpixel" where it uses subpixel.

Any study can be run on the embedded synthetic data by adding
`base=default` (e.g. configs/ablations.py:base=default,fgsa=off).
"""

import ml_collections

from configs import default
from configs import fgtbt_paper
from fgtbt_jax import losses
from fgtbt_jax.models import fgsa as fgsa_lib
from fgtbt_jax.models import heads as heads_lib

_ON_OFF = {"on": True, "off": False}
STUDIES = (
    "beta=0", "beta=0.3", "beta=0.6", "beta=0.9", "beta=0.999",
    "balancer=fmb", "balancer=uniform", "balancer=dwa", "balancer=uncertainty",
    "frequency=fft", "frequency=srm", "frequency=wavelet",
    "fgsa=off", "fmb=off", "fgsa=off,fmb=off",
    "head=heatmap", "head=hih", "head=recurrent",
    "lowres=on", "dhln=on", "sht=on", "input_downsample=3",
)
# The low-resolution training mode's factors (SHT's 2x / 4x / 8x faces).
LOWRES_FACTORS = (2, 4, 8)
# The HIH decoder that decodes the decimal map as the base decodes the heatmaps.
_HIH_DECODER = {"argmax": "hih", "quarter": "hih", "subpixel": "hih_subpixel"}


def _choice(key: str, value: str, allowed) -> str:
  if value not in allowed:
    raise ValueError(f"ablations: {key}={value!r}; expected one of {tuple(allowed)}")
  return value


def get_config(study: str = "") -> ml_collections.ConfigDict:
  """The paper config (or the default one with base=default) with a study applied."""
  settings = {}
  for item in filter(None, (s.strip() for s in study.split(","))):
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"ablations: {item!r} is not key=value (e.g. beta=0.3); studies: {STUDIES}")
    settings[key.strip()] = value.strip()
  base = _choice("base", settings.pop("base", "paper"), ("paper", "default"))
  config = fgtbt_paper.get_config() if base == "paper" else default.get_config()
  for key, value in settings.items():
    if key == "beta":
      try:
        config.loss.beta = float(value)
      except ValueError:
        raise ValueError(f"ablations: beta={value!r} is not a number") from None
    elif key == "balancer":
      config.loss.balancer = _choice(key, value, losses.BALANCERS)
    elif key == "frequency":
      config.model.frequency_extractor = _choice(key, value, fgsa_lib.FREQUENCY_EXTRACTORS)
    elif key == "fgsa":
      config.model.fgsa = _ON_OFF[_choice(key, value, _ON_OFF)]
    elif key == "fmb":
      if not _ON_OFF[_choice(key, value, _ON_OFF)]:
        config.loss.balancer = "uniform"
    elif key == "head":
      config.model.head = _choice(key, value, heads_lib.HEADS)
      if value == "hih":
        config.eval.decoder = _HIH_DECODER[config.eval.decoder]
    elif key in ("lowres", "dhln", "sht"):
      on = _ON_OFF[_choice(key, value, _ON_OFF)]
      if key == "sht":
        config.sht.enabled = on
      if key in ("dhln", "sht") and on:
        config.model.hallucination = True
      elif key == "dhln":
        config.model.hallucination = False
      if on:
        config.lowres.factors = LOWRES_FACTORS
    elif key == "input_downsample":
      if not value.isdigit() or int(value) < 1:
        raise ValueError(f"ablations: input_downsample={value!r} is not a positive integer")
      config.model.input_downsample = int(value)
    else:
      raise ValueError(f"ablations: unknown setting {key!r}; expected base, beta, balancer, "
                       f"frequency, fgsa, fmb, head, lowres, dhln, sht or input_downsample "
                       f"(studies: {STUDIES})")
  return config
