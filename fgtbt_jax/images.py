"""Image decoding and encoding (OpenCV, no TensorFlow), for data and inference alike.

`load_image` turns whatever a `FaceRecord.image` holds (a path, encoded bytes
or a decoded array) into one thing: an H x W x 3 uint8 RGB array. It accepts
grayscale, RGBA, 16-bit and palette images, and raises `DataError` naming the
file for a missing, empty, truncated or undecodable one. A JPEG cut short is
the common failure of copied datasets, and OpenCV decodes it "successfully"
into a half-grey picture with only a warning on stderr, so JPEGs are checked
for their end-of-image marker before decoding. With `strict=True` (the
dataset converter) a JPEG whose entropy-coded data is damaged inside (the
decoder recovers with a warning, "Corrupt JPEG data: ...", and returns a
garbled picture) is refused too: libjpeg-turbo, through simplejpeg, decodes it
at 1/8 scale with its warnings as errors.

EXIF orientation: with `orient=True` (prediction on users' photos) the
image is turned as a viewer displays it (a phone JPEG of orientation 6 is
rotated 90 degrees clockwise), so landmarks come out in the coordinates the
user sees. Datasets are read without it (the converter's default): their
annotations refer to the stored pixel grid, as the benchmarks' own loaders
(PIL's `Image.open`, OpenCV's unchanged read) see it.
"""

from __future__ import annotations

import io
import os
from typing import Union

import cv2
import numpy as np
from PIL import Image
import simplejpeg

from fgtbt_jax.errors import DataError

ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, np.ndarray]

_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_EXIF_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the array operation that shows the image upright
# (the inverse of how the camera stored it); 1 (upright) and unknown values
# leave it as stored.
_ORIENT = {
    2: lambda a: a[:, ::-1],                          # mirrored
    3: lambda a: a[::-1, ::-1],                       # upside down
    4: lambda a: a[::-1],                             # mirrored upside down
    5: lambda a: np.swapaxes(a, 0, 1),                # transposed
    6: lambda a: np.rot90(a, k=-1),                   # to be turned 90 degrees clockwise
    7: lambda a: np.swapaxes(a, 0, 1)[::-1, ::-1],    # transversed
    8: lambda a: np.rot90(a, k=1),                    # to be turned 90 degrees anticlockwise
}


def load_image(source: ImageInput, where: str | None = None,
               strict: bool = False, orient: bool = False) -> np.ndarray:
  """Decodes `source` into an H x W x 3 uint8 RGB array.

  Args:
    source: a path to an image file, the encoded bytes of one (JPEG, PNG, BMP,
      ... anything OpenCV decodes), or a decoded array that is already RGB
      (H x W, H x W x 1, H x W x 3 or H x W x 4; uint8, uint16 or bool).
    where: how to name the image in error messages; defaults to the path,
      or "<bytes>" / "<array>".
    strict: also refuse a JPEG that decodes only with a corrupt-data warning.
    orient: apply the file's EXIF orientation (`exif_orientation`), as image
      viewers do; arrays are taken as they are.

  Grayscale is repeated into three channels, 16-bit values are scaled to 8
  bit (round(v / 257)), an alpha channel is composited over black (an opaque
  image keeps its colours exactly), palette images are expanded.

  Raises:
    DataError: the file is missing, empty, truncated, not an image, or the
      array has an unsupported shape or dtype.
  """
  if isinstance(source, np.ndarray):
    return to_rgb_uint8(source, where or "<array>", bgr=False)
  if isinstance(source, (str, os.PathLike)):
    path = os.fspath(source)
    where = where or path
    if not os.path.exists(path):
      raise DataError(where, "image file not found", "missing_image")
    if not os.path.isfile(path):
      raise DataError(where, "not a regular file (a folder or a device)", "corrupt_image")
    with open(path, "rb") as f:
      data = f.read()
  elif isinstance(source, (bytes, bytearray, memoryview)):
    data = bytes(source)
    where = where or "<bytes>"
  else:
    raise DataError(where or "<image>",
                    f"cannot load an image from a {type(source).__name__}",
                    "corrupt_image")
  return decode_image(data, where, strict=strict, orient=orient)


def exif_orientation(data: bytes) -> int:
  """The EXIF orientation (1-8) of encoded image bytes; 1 when they hold none.

  Read from the header (PIL parses it without decoding the pixels); a value
  outside 1-8 counts as 1, as viewers treat it.
  """
  try:
    with Image.open(io.BytesIO(data)) as image:
      value = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
  except (OSError, ValueError, SyntaxError):  # A format PIL does not read: no EXIF for it.
    return 1
  return int(value) if isinstance(value, int) and 1 <= value <= 8 else 1


def decode_image(data: bytes, where: str, strict: bool = False,
                 orient: bool = False) -> np.ndarray:
  """Decodes encoded image bytes into H x W x 3 uint8 RGB; see `load_image`."""
  if not data:
    raise DataError(where, "image file is empty", "corrupt_image")
  if data.startswith(_JPEG_SOI) and not _jpeg_is_complete(data):
    raise DataError(where, "truncated JPEG: no end-of-image marker after the "
                    "image data (the file was cut short)", "corrupt_image")
  if strict and data.startswith(_JPEG_SOI):
    _check_jpeg_data(data, where)
  if data.startswith(_PNG_SIGNATURE) and data.rfind(b"IEND") < 0:
    raise DataError(where, "truncated PNG: no IEND chunk (the file was cut "
                    "short)", "corrupt_image")
  decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
  if decoded is None or decoded.size == 0:
    raise DataError(where, "not a decodable image (corrupt data or not an "
                    "image file)", "corrupt_image")
  turn = _ORIENT.get(exif_orientation(data)) if orient else None
  if turn is not None:
    decoded = np.ascontiguousarray(turn(decoded))
  return to_rgb_uint8(decoded, where, bgr=True)


def _check_jpeg_data(data: bytes, where: str) -> None:
  """Raises DataError when libjpeg decodes `data` only with a corrupt-data warning.

  A JPEG that fails even without warnings as errors (say, CMYK, which the
  RGB conversion does not take) is left to OpenCV to decode or refuse.
  """
  try:
    simplejpeg.decode_jpeg(data, min_factor=8, strict=True)
  except ValueError as warning:
    try:
      simplejpeg.decode_jpeg(data, min_factor=8, strict=False)
    except ValueError:
      return
    raise DataError(where, f"corrupt JPEG data inside the image ({warning}); the "
                    "decoder would return a garbled picture", "corrupt_image") from None


def _jpeg_is_complete(data: bytes) -> bool:
  """Whether a JPEG has an end-of-image marker after its first scan starts.

  Walks the marker segments from the start of the file to the first
  start-of-scan (so an EXIF thumbnail's own end marker in APP1 is skipped),
  then looks for FF D9 in the rest: entropy-coded data stuffs every FF byte
  with 00, so FF D9 there can only be the real end marker.
  """
  pos = 2
  n = len(data)
  while pos + 4 <= n:
    if data[pos] != 0xFF:
      return False  # Lost sync in the headers: corrupt, not a valid JPEG.
    marker = data[pos + 1]
    if marker == 0xFF:  # Fill byte before a marker.
      pos += 1
      continue
    if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # Markers without length.
      pos += 2
      continue
    if marker == 0xD9:
      return False  # End of image before any scan: no image data.
    length = (data[pos + 2] << 8) | data[pos + 3]
    if marker == 0xDA:  # Start of scan: the entropy-coded data follows.
      return data.find(_JPEG_EOI, pos + 2 + length) >= 0
    pos += 2 + length
  return False


def to_rgb_uint8(array: np.ndarray, where: str, bgr: bool = False) -> np.ndarray:
  """Converts a decoded image array to H x W x 3 uint8 RGB.

  `bgr` says the channels are in OpenCV's BGR(A) order rather than RGB(A).
  """
  array = np.asarray(array)
  if array.ndim == 3 and array.shape[2] == 1:
    array = array[..., 0]
  if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
    raise DataError(where, f"unsupported image shape {array.shape}; expected "
                    "H x W, H x W x 1, H x W x 3 or H x W x 4", "corrupt_image")
  if array.shape[0] == 0 or array.shape[1] == 0:
    raise DataError(where, f"image of zero size {array.shape}", "corrupt_image")
  if array.dtype == np.uint8:
    pass
  elif array.dtype == np.uint16:
    array = np.round(array.astype(np.float32) / 257.0).astype(np.uint8)
  elif array.dtype == np.bool_:
    array = array.astype(np.uint8) * 255
  else:
    raise DataError(where, f"unsupported image dtype {array.dtype}; expected "
                    "uint8, uint16 or bool", "corrupt_image")
  if array.ndim == 2:
    return np.repeat(array[:, :, None], 3, axis=2)
  if array.shape[2] == 4:
    alpha = array[..., 3:4].astype(np.uint16)
    # Composite over black: exact for opaque pixels (alpha 255).
    array = ((array[..., :3].astype(np.uint16) * alpha + 127) // 255).astype(np.uint8)
  if bgr:
    array = array[..., ::-1]
  return np.ascontiguousarray(array)


def encode_image(array: np.ndarray, format: str = "jpeg", quality: int = 95) -> bytes:  # pylint: disable=redefined-builtin
  """Encodes an H x W x 3 (or H x W) uint8 RGB array as JPEG or PNG bytes.

  `quality` (1-100) applies to JPEG only; PNG is lossless.
  """
  array = np.asarray(array)
  if array.dtype != np.uint8 or array.ndim not in (2, 3) or (
      array.ndim == 3 and array.shape[2] != 3):
    raise ValueError(f"encode_image expects H x W x 3 or H x W uint8, got "
                     f"{array.shape} {array.dtype}")
  if array.ndim == 3:
    array = np.ascontiguousarray(array[..., ::-1])
  fmt = format.lower()
  if fmt in ("jpeg", "jpg"):
    if not 1 <= int(quality) <= 100:
      raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    ok, buf = cv2.imencode(".jpg", array, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
  elif fmt == "png":
    ok, buf = cv2.imencode(".png", array)
  else:
    raise ValueError(f"unknown image format {format!r}; expected 'jpeg' or 'png'")
  if not ok:
    raise ValueError(f"OpenCV could not encode a {array.shape} image as {fmt}")
  return buf.tobytes()
