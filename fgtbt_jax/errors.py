"""The project's error types for bad inputs: data files, protocol names, configs.

A leaf module (it imports nothing from the project), so every layer can raise
and catch these without importing the layers above it.

Every reader and the image loader raise `DataError` for anything wrong with
the user's data (a missing image, a line with the wrong number of fields, a
NaN coordinate, ...). The message always starts with where the problem is
(`file:line`, `file[index]` or `file:key`), and `kind` is a short category
that `ReadReport` counts skipped samples by.
"""

from __future__ import annotations


class DataError(ValueError):
  """A problem with a dataset file, located by `where`.

  Attributes:
    where: the file and line, index or key the problem was found at.
    reason: what is wrong, without the location.
    kind: a short category, e.g. "missing_image", "field_count",
      "bad_coordinates", "zero_box", "missing_key", "empty_file",
      "corrupt_image".
  """

  def __init__(self, where: str, reason: str, kind: str = "invalid"):
    super().__init__(f"{where}: {reason}")
    self.where = where
    self.reason = reason
    self.kind = kind


class UnknownProtocolError(ValueError):
  """A dataset / protocol name that is none of the known ones.

  The message is "unknown protocol 'X'; expected one of [...]".
  """

  def __init__(self, name, known):
    super().__init__(f"unknown protocol {name!r}; expected one of {list(known)}")
    self.name = name
    self.known = tuple(known)

  # The default would call the class with the message alone (worker processes
  # pickle errors back to the parent).
  def __reduce__(self):
    return type(self), (self.name, self.known)


class ConfigError(ValueError):
  """A config value that cannot work, named with its key."""
