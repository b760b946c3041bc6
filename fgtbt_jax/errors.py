"""The project's error types for bad inputs: data files, protocol names, configs.

A leaf module (it imports nothing from the project), so every layer can raise
and catch these without importing the layers above it. `read_json_object`
reads a user's JSON file with these errors (the boxes and faces files);
`quiet_library_logs` keeps the libraries' errors to one line each on a
command's console, so that it ends with the line that says what happened;
`progress_bar` is the one look of the console's progress bars (training,
evaluation, predict, synthetic rendering: done/total, rate and ETA) and
`logs_above_bars` keeps log lines from breaking them.

Every reader and the image loader raise `DataError` for anything wrong with
the user's data (a missing image, a line with the wrong number of fields, a
NaN coordinate, ...). The message always starts with where the problem is
(`file:line`, `file[index]` or `file:key`), and `kind` is a short category
that `ReadReport` counts skipped samples by.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pathlib
import sys
from typing import Iterable, Iterator

import tqdm


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


def read_json_object(path: str | os.PathLike, what: str, expected: str) -> dict:
  """The JSON object in the file at `path`, or a `DataError` naming the file.

  `what` names the file in messages ("boxes file"), `expected` the shape the
  caller wants ("{image: [[x1, y1, x2, y2], ...]}"). Missing or unreadable
  ("missing_file"), blank or an empty object ("empty_file"), not JSON (with
  its line and column) or not an object ("bad_json").
  """
  where = os.fspath(path)
  try:
    text = pathlib.Path(path).read_text()
  except OSError as e:
    raise DataError(where, f"cannot read the {what} ({e.strerror or e})", "missing_file"
                    ) from None
  if not text.strip():
    raise DataError(where, f"the {what} is empty", "empty_file")
  try:
    content = json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f"{where}:{e.lineno}:{e.colno}", f"not valid JSON ({e.msg})", "bad_json"
                    ) from None
  if not isinstance(content, dict):
    raise DataError(where, f"expected a non-empty JSON object {expected}, got "
                    f"{type(content).__name__}",
                    "bad_json")
  if not content:
    raise DataError(where, f"the {what} names no image", "empty_file")
  return content


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


def config_flag_error(error: Exception, argv: list[str]) -> str:
  """One line for a --config file or --config.* override that ml_collections refused."""
  if isinstance(error, AttributeError) and "has no attribute 'get_config'" in str(error):
    args = argv[1:]
    named = [a.split("=", 1)[1] if "=" in a else args[i + 1] for i, a in enumerate(args)
             if a.startswith("--config=") or (a == "--config" and i + 1 < len(args))]
    return (f"the config file {named[-1] if named else 'configs/default.py'} has no "
            "get_config() function returning its ConfigDict")
  if isinstance(error, (AttributeError, KeyError)):
    # lock_config: overriding a field the config does not declare.
    inner = error.args[0] if error.args else error
    if isinstance(inner, KeyError) and inner.args:
      inner = inner.args[0]
    message = str(inner).replace("\n", "; ")
    return f"unknown config field in the command line: {message}"
  return f"bad config override: {error}"


class OutputError(OSError):
  """An output could not be written (read-only folder, full disk); names the path and the fix."""


def is_disk_full(error: BaseException | None) -> bool:
  """Whether `error` (or one it was raised from) is a full disk or an exhausted quota.

  Writers in C++ (Orbax's tensorstore, ArrayRecord) report a failed write as
  a ValueError or RuntimeError with the OS message in its text.
  """
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if any(text in str(error) for text in ("No space left on device", "Disk quota exceeded")):
      return True
    error = error.__cause__ or error.__context__
  return False


class _QuietLibraries(logging.Filter):
  """Keeps Orbax's and TFDS's INFO chatter out of the console (warnings stay).

  They log through absl's one logger, so a per-logger level cannot tell them
  apart from ours; the record's source file does. Their errors (and
  asyncio's) keep one line each, without the tracebacks: a failed
  asynchronous save (a full disk) logs hundreds of lines from its threads.
  """

  LIBRARIES = ("orbax", "tensorflow_datasets", "asyncio")

  def filter(self, record: logging.LogRecord) -> bool:
    library = record.name == "asyncio" or any(name in record.pathname
                                              for name in self.LIBRARIES)
    if not library:
      return True
    if record.levelno >= logging.ERROR:
      record.exc_info, record.exc_text, record.stack_info = None, None, None
      record.msg, record.args = record.getMessage().split("\n", 1)[0][:300], ()
    return record.levelno >= logging.WARNING


def _drop_closed_loop_reports(hook):
  """A sys.unraisablehook that drops "Event loop is closed" from tensorstore callbacks.

  After an asynchronous Orbax save fails, its event loop is closed while
  tensorstore still completes the other writes, each reporting into the
  closed loop (about a thousand tracebacks for the paper model).
  """
  def filtered(unraisable):
    if (isinstance(unraisable.exc_value, RuntimeError)
        and str(unraisable.exc_value) == "Event loop is closed"):
      return
    hook(unraisable)
  return filtered


def quiet_library_logs() -> None:
  """For a command's console: the libraries' INFO logs off, their errors one line each."""
  quiet = _QuietLibraries()
  logging.getLogger("absl").addFilter(quiet)
  logging.getLogger("asyncio").addFilter(quiet)
  sys.unraisablehook = _drop_closed_loop_reports(sys.unraisablehook)


# Every bar reads: label, percentage, bar, done/total, then elapsed time, ETA,
# rate and the caller's postfix.
BAR_FORMAT = ("{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
              "[{elapsed} elapsed, ETA {remaining}, {rate_fmt}{postfix}]")


def progress_bar(iterable: Iterable | None = None, *, total: float | None = None,
                 desc: str, unit: str, initial: int = 0, leave: bool = True,
                 enabled: bool = True) -> tqdm.tqdm:
  """A console progress bar (tqdm, on stderr) with done/total, rate and ETA.

  `enabled` False (e.g. processes other than 0 of a multi-host run) gives a
  bar that shows nothing; TQDM_DISABLE=1 in the environment turns every bar
  off. The bar redraws at most every 0.5 s on a terminal, every 30 s when
  stderr is a file or pipe (a log stays short); TQDM_MININTERVAL overrides it.
  """
  options = {}
  if not enabled:  # Passed only when off: an explicit value would override TQDM_DISABLE.
    options["disable"] = True
  if "TQDM_MININTERVAL" not in os.environ:
    try:
      terminal = sys.stderr.isatty()
    except (AttributeError, ValueError):
      terminal = False
    options["mininterval"] = 0.5 if terminal else 30.0
  return tqdm.tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave,
                   bar_format=BAR_FORMAT, dynamic_ncols=True, **options)


class _AboveBars(logging.Handler):
  """Hands records to `inner` with the progress bars cleared, then redraws them."""

  def __init__(self, inner: logging.Handler):
    super().__init__(inner.level)
    self.inner = inner

  def handle(self, record: logging.LogRecord) -> bool:
    with tqdm.tqdm.external_write_mode():
      return self.inner.handle(record)

  def emit(self, record: logging.LogRecord) -> None:
    self.inner.emit(record)


@contextlib.contextmanager
def logs_above_bars() -> Iterator[None]:
  """Within it, log lines (the root logger's handlers: absl's among them) print above
  the progress bars instead of through them."""
  root = logging.getLogger()
  wrapped = [_AboveBars(handler) for handler in root.handlers]
  originals = {id(w): w.inner for w in wrapped}
  root.handlers = wrapped
  try:
    yield
  finally:
    root.handlers = [originals.get(id(h), h) for h in root.handlers]
