"""Image files -> pixels, one way for training, evaluation and the edge runtime (numpy + OpenCV only).

Decoding trusts nothing a file says: the header is read first and an image over the pixel cap is
refused before a byte is decoded (an 876 KB all-zero PNG can claim 30000x30000 = 2.7 GB of RGB),
truncated PNG/JPEG/BMP files are refused (OpenCV would decode half of them silently), and images
too small to be a frame of a product (below MIN_IMAGE_SIDE) are refused with a message that says so.
Every refusal is a `DataError` naming the file; the runtime's sources count them as corrupt.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "MIN_IMAGE_SIDE",
    "DataError",
    "find_images",
    "image_size",
    "load_image",
    "load_mask",
    "max_image_pixels",
    "resize_image",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MAX_IMAGE_PIXELS = 50_000_000  # 50 MP: above any line-scan tile we expect; 150 MB as RGB uint8
MAX_PIXELS_ENV = "HGAD_EDGE_MAX_IMAGE_PIXELS"  # override of MAX_IMAGE_PIXELS without code changes
MIN_IMAGE_SIDE = 8  # a side below this holds no texture to score (and 1x1 is a broken export)
_BYTES_PER_PIXEL = 8  # 16-bit RGBA uncompressed: the most a file can honestly spend per pixel


class DataError(ValueError):
    """A problem with the user's data; the message names the path and says how to fix it."""


def max_image_pixels() -> int:
    """The pixel cap in force: $HGAD_EDGE_MAX_IMAGE_PIXELS if set (a positive integer), else MAX_IMAGE_PIXELS."""
    text = os.environ.get(MAX_PIXELS_ENV)
    if not text:
        return MAX_IMAGE_PIXELS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        msg = f"{MAX_PIXELS_ENV}={text!r} is not a positive integer; unset it or give a pixel count, e.g. 50000000"
        raise DataError(msg)
    return value


def load_image(path: Path | str, max_pixels: int | None = None, min_side: int = MIN_IMAGE_SIDE) -> np.ndarray:
    """Decode an image file to HxWx3 uint8 RGB, refusing truncated, oversized or unreadable files.

    Truncation is checked on the raw bytes because OpenCV silently decodes half a JPEG (grey
    bottom rows), which would poison training or scoring without any visible error.
    EXIF orientation is ignored so that pixels match what the deployment camera delivers.
    """
    path = Path(path)
    decoded = _decode(path, "image", f"a readable {'/'.join(IMAGE_EXTENSIONS)} file", max_pixels, min_side)
    return _to_rgb8(decoded, path)


def load_mask(path: Path | str, shape: Sequence[int] | None = None, max_pixels: int | None = None) -> np.ndarray:
    """Load a defect mask as HxW bool (any nonzero pixel is defect), so 0/1 and 0/255 masks agree.

    With `shape` (H, W) the mask is resized nearest-neighbour, keeping it binary.
    """
    path = Path(path)
    mask = _decode(path, "mask", "a readable image file", max_pixels, 1)
    if mask.ndim == 3:
        mask = mask[..., :3].max(axis=2) if mask.shape[2] >= 3 else mask[..., 0]
    binary = mask != 0
    if shape is not None:
        height, width = int(shape[0]), int(shape[1])
        if binary.shape != (height, width):
            resized = cv2.resize(binary.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
            binary = resized != 0
    return binary


def resize_image(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize to (H, W): INTER_AREA when shrinking (no aliasing), INTER_LINEAR otherwise.

    The deployment runtime calls this exact function so that training and inference see
    identical pixels; keep it free of randomness and of size-dependent special cases.
    """
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
        msg = f"resize_image expects an HxWx3 (or HxW) uint8 image, got shape {img.shape} dtype {img.dtype}"
        raise ValueError(msg)
    height, width = int(size[0]), int(size[1])
    if height <= 0 or width <= 0:
        msg = f"resize_image target size must be positive (H, W), got {size}"
        raise ValueError(msg)
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    src_h, src_w = img.shape[:2]
    if (src_h, src_w) == (height, width):
        return np.ascontiguousarray(img).copy()
    shrinking = height <= src_h and width <= src_w
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    out = cv2.resize(np.ascontiguousarray(img), (width, height), interpolation=interpolation)
    return out.reshape(height, width, 3)


def find_images(folder: Path | str) -> list[Path]:
    """Image files under `folder`, sub-folders included, sorted by relative path (the same folder
    always gives the same order). Hidden entries and archive debris (.x, __MACOSX) are skipped and
    symlinked folders are not followed (no loops)."""
    root, found = Path(folder), []
    for parent, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
        found += [Path(parent) / f for f in files if Path(f).suffix.lower() in IMAGE_EXTENSIONS and f[0] != "."]
    return sorted(found, key=lambda p: p.relative_to(root).parts)


# ---- header ---------------------------------------------------------------------------------------
def image_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a PNG/JPEG/BMP/TIFF header without decoding; None if it cannot be read."""
    try:
        if data.startswith(b"\x89PNG\r\n\x1a\n"):
            return _png_size(data)
        if data.startswith(b"\xff\xd8"):
            return _jpeg_size(data)
        if data.startswith(b"BM"):
            return _bmp_size(data)
        if data[:4] in (b"II*\x00", b"MM\x00*"):
            return _tiff_size(data)
    except (struct.error, IndexError):
        return None
    return None


def _png_size(data: bytes) -> tuple[int, int] | None:
    if data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return height, width


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """Walk the marker segments up to the first start-of-frame (baseline, progressive, lossless...)."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # standalone markers carry no length
            pos += 2
            continue
        if marker in _JPEG_SOF:
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return height, width
        if marker == 0xDA:  # scan data before any frame header: not a JPEG we can size
            return None
        pos += 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]
    return None


def _bmp_size(data: bytes) -> tuple[int, int] | None:
    header = struct.unpack("<I", data[14:18])[0]
    if header == 12:  # BITMAPCOREHEADER (OS/2)
        width, height = struct.unpack("<HH", data[18:22])
    else:
        width, height = struct.unpack("<ii", data[18:26])
    return abs(height), abs(width)  # negative height = top-down rows


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    """ImageWidth (256) / ImageLength (257) of the first IFD."""
    order = "<" if data[:2] == b"II" else ">"
    ifd = struct.unpack(order + "I", data[4:8])[0]
    count = struct.unpack(order + "H", data[ifd : ifd + 2])[0]
    found: dict[int, int] = {}
    for i in range(count):
        tag, kind, _n = struct.unpack(order + "HHI", data[ifd + 2 + 12 * i : ifd + 10 + 12 * i])
        field = data[ifd + 10 + 12 * i : ifd + 14 + 12 * i]
        if tag in (256, 257):
            found[tag] = struct.unpack(order + ("H" if kind == 3 else "I"), field[: 2 if kind == 3 else 4])[0]
    if 256 not in found or 257 not in found:
        return None
    return found[257], found[256]


def _check_size(path: Path, data: bytes, what: str, expected: str, max_pixels: int | None, min_side: int) -> None:
    """Refuse by the header, before decoding: unknown size, over the pixel cap, or too small."""
    size = image_size(data)
    if size is None:
        msg = f"cannot decode {what} {path}: not {expected} (its header gives no image size); replace or delete it"
        raise DataError(msg)
    height, width = size
    cap = max_image_pixels() if max_pixels is None else int(max_pixels)
    if height * width > cap:
        msg = (
            f"{what} {path} claims {width}x{height} pixels ({height * width / 1e6:.0f} MP), "
            f"over the {cap / 1e6:.0f} MP cap "
            f"(decoding it could exhaust memory); downscale it, or raise the cap with {MAX_PIXELS_ENV}"
        )
        raise DataError(msg)
    if min(height, width) < min_side:
        msg = f"{what} {path} is {width}x{height} pixels, below the {min_side}x{min_side} minimum: not a camera frame"
        raise DataError(msg)


# ---- decoding -------------------------------------------------------------------------------------
def _decode(path: Path, what: str, expected: str, max_pixels: int | None, min_side: int) -> np.ndarray:
    """Raw bytes -> completeness and size checks -> OpenCV decode at native bit depth; DataError otherwise."""
    data = _read_bytes(path, what, max_pixels)
    _check_complete(path, data)
    _check_size(path, data, what, expected, max_pixels, min_side)
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is None:
        msg = f"cannot decode {what} {path}: not {expected}; replace or delete it"
        raise DataError(msg)
    return decoded


def _read_bytes(path: Path, what: str, max_pixels: int | None) -> bytes:
    """Read a whole file, turning OS errors into a DataError that names the file."""
    if not path.exists():
        msg = f"{what} file {path} does not exist; check the dataset path or restore the file"
        raise DataError(msg)
    if not path.is_file():
        msg = f"{what} path {path} is not a file; expected an image file"
        raise DataError(msg)
    try:
        limit = _BYTES_PER_PIXEL * (max_image_pixels() if max_pixels is None else int(max_pixels)) + (1 << 20)
        if path.stat().st_size > limit:
            size_mb = path.stat().st_size / 1e6
            msg = f"{what} file {path} is {size_mb:.0f} MB, more than any image under the pixel cap; replace it"
            raise DataError(msg)
        data = path.read_bytes()
    except OSError as err:
        msg = f"cannot read {what} file {path}: {err.strerror or err}; check its permissions"
        raise DataError(msg) from err
    if not data:
        msg = f"{what} file {path} is empty (0 bytes); re-copy or delete it"
        raise DataError(msg)
    return data


def _check_complete(path: Path, data: bytes) -> None:
    """Raise if a PNG/JPEG/BMP ends early; OpenCV would otherwise decode it partially."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        complete = _png_has_iend(data)
    elif data.startswith(b"\xff\xd8"):
        eoi = data.rfind(b"\xff\xd9")
        complete = eoi >= 0 and eoi > data.rfind(b"\xff\xda")  # EOI must follow the last scan
    elif data.startswith(b"BM") and len(data) >= 6:
        complete = len(data) >= int.from_bytes(data[2:6], "little")
    else:
        return
    if not complete:
        msg = f"image file {path} is truncated (incomplete download or copy); re-copy or delete it"
        raise DataError(msg)


def _png_has_iend(data: bytes) -> bool:
    """Walk the PNG chunk list; a file is complete only if IEND is reached inside the data."""
    pos = 8
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > len(data):
            return False
        if kind == b"IEND":
            return True
        pos = end
    return False


def _to_rgb8(img: np.ndarray, path: Path) -> np.ndarray:
    """Normalise OpenCV's decoded array (gray / BGR / BGRA, 8/16-bit/float) to uint8 RGB."""
    img = _to_uint8(img, path)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    channels = img.shape[2]
    if channels == 2:  # gray + alpha
        return cv2.cvtColor(np.ascontiguousarray(img[..., 0]), cv2.COLOR_GRAY2RGB)
    if channels == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    if channels == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    msg = f"image file {path} has {channels} channels; expected gray, RGB or RGBA"
    raise DataError(msg)


def _to_uint8(img: np.ndarray, path: Path) -> np.ndarray:
    """Scale 16-bit (round(x / 257), so 65535 -> 255) and float images to 8 bits."""
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return ((img.astype(np.uint32) * 2 + 257) // 514).astype(np.uint8)
    if img.dtype in (np.float32, np.float64):
        finite = np.nan_to_num(img.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        scale = 255.0 if finite.size and finite.max() <= 1.0 else 1.0
        return np.clip(np.rint(finite * scale), 0, 255).astype(np.uint8)
    msg = f"image file {path} has unsupported pixel type {img.dtype}; convert it to 8- or 16-bit"
    raise DataError(msg)
