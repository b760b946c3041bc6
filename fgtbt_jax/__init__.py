"""FGTBT (Frequency-Guided Task-Balancing Transformer) for unified facial landmark detection.

    from fgtbt_jax import Predictor
    predictor = Predictor.from_checkpoint("runs/default")
    faces = predictor.predict(image)           # see fgtbt_jax/deploy/predictor.py

The command line is `fgtbt <command>` (fgtbt_jax/commands) or `python run.py`.
The top-level names load their modules when first used, so `import
fgtbt_jax.<module>` stays as light as that module.
"""

__all__ = ["Predictor"]


def __getattr__(name: str):
  if name == "Predictor":
    from fgtbt_jax.deploy.predictor import Predictor  # pylint: disable=import-outside-toplevel
    return Predictor
  raise AttributeError(f"module 'fgtbt_jax' has no attribute {name!r}")
