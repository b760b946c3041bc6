"""Data: the dataset registry, the readers of every public annotation format, synthetic
stand-ins, conversion to TFDS ArrayRecord crops, the grain train/eval pipelines and
data preparation. `data_pipelines/` holds the commands over it (convert, synthetic,
visualize).

  datasets       the registry: subsets, point flags, builder names, counts, paper numbers
  records        the record type readers produce
  readers        one reader per annotation format, and a folder of images with one each
  schemes        the point schemes of a user's own datasets (unified point names)
  synthetic      synthetic faces written in the real formats
  tfds_builders  the TFDS builders (crops, conventions)
  convert        a dataset's conversion; the synthetic set's on first use
  config         the data config's pipeline facts
  pipeline       the grain train/eval pipelines
  prepare        which converted datasets a run needs, made on first use
"""
