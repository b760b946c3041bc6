"""Deployment: landmarks of whole images, folders and videos with a trained model.

  detector       face detectors, box checks and the per-detector box adjustments
  calibrate      fitting a detector's box adjustment on your own annotated faces
  video          One Euro smoothing and face tracking between detections
  visualization  landmark overlays
  predictor      `Predictor`: a run's EMA model on whole images (boxes or a detector)
  predict_files  the predict command: files, folders and videos to JSON and overlays
  export         the inference function as a standalone StableHLO artifact
  onnx_export    the inference function as an ONNX model, run with onnxruntime
"""
