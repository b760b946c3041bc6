"""Tests for fgtbt_jax.images: decoding every image kind, bad files."""

import struct
import zlib

import cv2
import numpy as np
import pytest

from fgtbt_jax.errors import DataError
from fgtbt_jax import images
from fgtbt_jax.images import encode_image, load_image


def _gradient_rgb(h=24, w=32):
  y, x = np.mgrid[:h, :w]
  return np.stack([x * 7 % 256, y * 9 % 256, (x + y) * 3 % 256], -1).astype(np.uint8)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
  return (struct.pack(">I", len(data)) + kind + data
          + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def _palette_png(indices: np.ndarray, palette: np.ndarray) -> bytes:
  """A colour-type-3 (palette) PNG, written by hand: OpenCV cannot write one."""
  h, w = indices.shape
  raw = b"".join(b"\x00" + row.astype(np.uint8).tobytes() for row in indices)
  return (b"\x89PNG\r\n\x1a\n"
          + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0))
          + _png_chunk(b"PLTE", palette.astype(np.uint8).tobytes())
          + _png_chunk(b"IDAT", zlib.compress(raw))
          + _png_chunk(b"IEND", b""))


def test_rgb_order_from_a_file_written_by_opencv(tmp_path):
  path = tmp_path / "red.png"
  bgr = np.zeros((4, 5, 3), np.uint8)
  bgr[..., 2] = 250  # red in OpenCV's BGR order
  cv2.imwrite(str(path), bgr)
  image = load_image(str(path))
  assert image.shape == (4, 5, 3) and image.dtype == np.uint8
  np.testing.assert_array_equal(image[0, 0], [250, 0, 0])


def test_png_bytes_roundtrip_exact_and_jpeg_close():
  rgb = _gradient_rgb()
  np.testing.assert_array_equal(load_image(encode_image(rgb, "png")), rgb)
  smooth = cv2.GaussianBlur(rgb, (0, 0), 3)
  decoded = load_image(encode_image(smooth, "jpeg", quality=95))
  assert decoded.shape == smooth.shape
  assert np.abs(decoded.astype(int) - smooth).mean() < 3


def test_grayscale_png_becomes_three_equal_channels(tmp_path):
  grey = (np.arange(20 * 30).reshape(20, 30) % 256).astype(np.uint8)
  path = tmp_path / "grey.png"
  cv2.imwrite(str(path), grey)
  image = load_image(str(path))
  assert image.shape == (20, 30, 3)
  for c in range(3):
    np.testing.assert_array_equal(image[..., c], grey)


def test_rgba_png_is_composited_over_black(tmp_path):
  bgra = np.zeros((2, 3, 4), np.uint8)
  bgra[..., :3] = (10, 100, 200)  # B, G, R
  bgra[0, :, 3] = 255
  bgra[1, 0, 3] = 0
  bgra[1, 1:, 3] = 128
  path = tmp_path / "rgba.png"
  cv2.imwrite(str(path), bgra)
  image = load_image(str(path))
  assert image.shape == (2, 3, 3)
  np.testing.assert_array_equal(image[0], [[200, 100, 10]] * 3)  # opaque: exact
  np.testing.assert_array_equal(image[1, 0], [0, 0, 0])  # transparent: black
  np.testing.assert_array_equal(image[1, 1], [100, 50, 5])  # half: halved


def test_16bit_png_is_scaled_to_8bit(tmp_path):
  values = np.array([[0, 257 * 100, 65535], [257 * 37 + 100, 128, 65535 - 200]], np.uint16)
  path = tmp_path / "deep.png"
  cv2.imwrite(str(path), values)
  assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED).dtype == np.uint16
  image = load_image(str(path))
  assert image.dtype == np.uint8
  np.testing.assert_array_equal(image[..., 0], [[0, 100, 255], [37, 0, 254]])


def test_palette_png_is_expanded():
  palette = np.array([[255, 0, 0], [0, 128, 0], [1, 2, 3]])
  indices = np.array([[0, 1, 2], [2, 1, 0]])
  image = load_image(_palette_png(indices, palette))
  np.testing.assert_array_equal(image, palette[indices])


def test_missing_file_names_it(tmp_path):
  path = tmp_path / "nope.jpg"
  with pytest.raises(DataError, match="nope.jpg: image file not found") as e:
    load_image(str(path))
  assert e.value.kind == "missing_image"


@pytest.mark.parametrize("keep", ["all_but_eoi", "two_thirds"])
def test_truncated_jpeg_is_detected(tmp_path, keep):
  data = encode_image(_gradient_rgb(64, 64), "jpeg")
  path = tmp_path / "cut.jpg"
  path.write_bytes(data[:-2] if keep == "all_but_eoi" else data[:len(data) * 2 // 3])
  with pytest.raises(DataError, match=r"cut.jpg: truncated JPEG") as e:
    load_image(str(path))
  assert e.value.kind == "corrupt_image"


def test_truncated_jpeg_with_a_thumbnail_is_detected():
  """An EXIF thumbnail's own end marker must not hide the cut main image."""
  data = encode_image(_gradient_rgb(64, 64), "jpeg")
  thumbnail = encode_image(_gradient_rgb(8, 8), "jpeg")  # contains FF D9
  payload = b"Exif\x00\x00" + thumbnail
  app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
  with_thumb = data[:2] + app1 + data[2:]
  assert load_image(with_thumb).shape == (64, 64, 3)  # complete: decodes
  with pytest.raises(DataError, match="truncated JPEG"):
    load_image(with_thumb[:-200], where="photo.jpg")


def test_truncated_png_and_garbage_and_empty(tmp_path):
  png = encode_image(_gradient_rgb(), "png")
  with pytest.raises(DataError, match="a.png: truncated PNG"):
    load_image(png[:len(png) // 2], where="a.png")
  text = tmp_path / "notes.jpg"
  text.write_text("this is not an image\n")
  with pytest.raises(DataError, match="notes.jpg: not a decodable image"):
    load_image(str(text))
  empty = tmp_path / "empty.png"
  empty.write_bytes(b"")
  with pytest.raises(DataError, match="empty.png: image file is empty"):
    load_image(str(empty))


def test_arrays_grey_uint16_bool_and_bad_ones():
  grey = np.arange(6, dtype=np.uint8).reshape(2, 3)
  np.testing.assert_array_equal(load_image(grey)[..., 2], grey)
  np.testing.assert_array_equal(load_image(grey[..., None])[..., 1], grey)
  assert load_image(np.full((2, 2), 65535, np.uint16)).max() == 255
  assert load_image(np.ones((2, 2), bool)).min() == 255
  rgb = _gradient_rgb()
  np.testing.assert_array_equal(load_image(rgb), rgb)  # arrays are already RGB
  with pytest.raises(DataError, match=r"cofw\[3\]: unsupported image dtype float32"):
    load_image(np.zeros((2, 2), np.float32), where="cofw[3]")
  with pytest.raises(DataError, match="unsupported image shape"):
    load_image(np.zeros((2, 2, 2), np.uint8))


def test_encode_image_rejects_bad_input():
  with pytest.raises(ValueError, match="uint8"):
    encode_image(np.zeros((4, 4, 3), np.float32))
  with pytest.raises(ValueError, match="unknown image format"):
    encode_image(np.zeros((4, 4, 3), np.uint8), "gif")
  small = encode_image(_gradient_rgb(), "jpeg", quality=10)
  large = encode_image(_gradient_rgb(), "jpeg", quality=100)
  assert len(small) < len(large)


def _with_orientation(rgb: np.ndarray, orientation: int, fmt: str) -> bytes:
  """`rgb` stored as is, with an EXIF orientation tag (PIL writes it)."""
  import io
  from PIL import Image
  exif = Image.Exif()
  exif[0x0112] = orientation
  buffer = io.BytesIO()
  Image.fromarray(rgb).save(buffer, format=fmt, exif=exif.tobytes(), quality=100)
  return buffer.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_viewers_do(orientation):
  import io
  from PIL import Image, ImageOps
  rgb = np.random.default_rng(orientation).integers(0, 256, (5, 8, 3), dtype=np.uint8)
  data = _with_orientation(rgb, orientation, "PNG")
  assert images.exif_orientation(data) == orientation
  with Image.open(io.BytesIO(data)) as opened:
    displayed = np.asarray(ImageOps.exif_transpose(opened).convert("RGB"))
  np.testing.assert_array_equal(images.load_image(data, orient=True), displayed)
  np.testing.assert_array_equal(images.load_image(data), rgb)  # datasets: the stored grid


def test_exif_orientation_of_images_without_it():
  assert images.exif_orientation(images.encode_image(np.zeros((4, 4, 3), np.uint8), "png")) == 1
  assert images.exif_orientation(b"not an image") == 1
