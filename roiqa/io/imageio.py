"""Robust image decoding from bytes to (H, W, 3) uint8 RGB, with header-only size checks and PNG/JPEG encoding."""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps

DEFAULT_MAX_PIXELS = 100_000_000

# The PIL formats decoded (PIL opens a JPEG with an MP extension as "MPO", through the JPEG plugin). Only these
# plugins ever see the bytes: others are refused from their signature (`unsupported_format`), because some decode
# whole embedded images while opening (ICO, CUR, ICNS wrap PNGs), before the pixel limit could be checked.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")

_ORIENTATION_TAG = 0x0112
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "I;16S"})


class DecodeError(ValueError):
    """Raised for bad image bytes; `.reason` is a short code, `.uri` names the input.

    Reasons: ``empty_file``, ``not_an_image``, ``unsupported_format``, ``truncated``, ``too_large``,
    ``unsupported_mode``, ``corrupt``.
    """

    def __init__(self, uri: str, reason: str, message: str):
        super().__init__(f"{uri}: {reason}: {message}")
        self.uri = uri
        self.reason = reason
        self.message = message

    def __reduce__(self):  # picklable across processes despite the three-argument constructor
        return type(self), (self.uri, self.reason, self.message)


def _failure(uri: str, exc: Exception) -> DecodeError:
    """Map an exception raised by PIL while opening or decoding to a DecodeError."""
    if isinstance(exc, Image.DecompressionBombError):
        return DecodeError(uri, "too_large", str(exc))
    if isinstance(exc, Image.UnidentifiedImageError):
        return DecodeError(uri, "not_an_image", "PIL cannot identify the image format")
    text = str(exc) or type(exc).__name__
    # PIL reports data that ends early as OSError "image file is truncated (...)" (JPEG, PNG) or
    # "Truncated File Read" (short header reads); EOFError is the same condition in a few plugins.
    if isinstance(exc, EOFError) or "truncat" in text.lower():
        return DecodeError(uri, "truncated", text)
    return DecodeError(uri, "corrupt", f"{type(exc).__name__}: {text}")


def _unidentified(data: bytes, uri: str, exc: Exception) -> DecodeError:
    """``unsupported_format`` when the signature is that of a format PIL knows but we do not accept (told from the
    plugins' signature checks alone, no plugin opens the bytes), else ``not_an_image``."""
    prefix = data[:16]
    for fmt in Image.ID:
        accept = Image.OPEN[fmt][1]
        if fmt in ACCEPTED_FORMATS or accept is None:
            continue
        try:
            result = accept(prefix)
        except Exception:
            continue
        if result and not isinstance(result, str):
            accepted = ", ".join(ACCEPTED_FORMATS)
            return DecodeError(uri, "unsupported_format", f"{fmt} data is not decoded (accepted: {accepted})")
    return _failure(uri, exc)


def _open_by_plugins(data: bytes, uri: str) -> ImageFile.ImageFile | None:
    """Image.open without PIL's global decompression-bomb check, and with a diagnosis when it fails.

    Walks the plugins of ACCEPTED_FORMATS the way Image.open does (header only, no pixel decoding). Returns None
    when none recognises the signature; raises DecodeError ``truncated`` (the parser ran out of bytes) or
    ``corrupt`` when one does but cannot parse the header.
    """
    Image.init()
    prefix = data[:16]
    failure: tuple[str, Exception, bool] | None = None
    for fmt in [f for f in Image.ID if f in ACCEPTED_FORMATS]:
        factory, accept = Image.OPEN[fmt]
        result = accept(prefix) if accept else True
        if not result or isinstance(result, str):  # a str is PIL's "rejected, with a warning"
            continue
        fp = io.BytesIO(data)
        try:
            return factory(fp, "")
        except (SyntaxError, IndexError, TypeError, ValueError, struct.error, OSError, EOFError) as exc:
            if accept is not None and failure is None:  # only a plugin that claimed the signature counts
                failure = (fmt, exc, fp.tell() >= len(data))
    if failure is None:
        return None
    fmt, exc, ran_out = failure
    if ran_out or "truncat" in str(exc).lower():
        raise DecodeError(uri, "truncated", f"{fmt} header cut short ({exc})")
    raise DecodeError(uri, "corrupt", f"{fmt} header unreadable: {type(exc).__name__}: {exc}")


def _reopen(data: bytes, uri: str) -> ImageFile.ImageFile | None:
    """_open_by_plugins, or None if PIL's internals are not what it expects (callers keep PIL's verdict)."""
    try:
        return _open_by_plugins(data, uri)
    except (DecodeError, MemoryError):
        raise
    except Exception:
        return None


def _open(data: bytes, uri: str) -> ImageFile.ImageFile:
    """Open lazily (header parsed, pixels not decoded); every failure is a DecodeError."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{uri}: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise DecodeError(uri, "empty_file", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own max_pixels applies instead
            im = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as exc:
        # PIL refuses more than 2 * Image.MAX_IMAGE_PIXELS at open; re-read the header to learn the real size.
        try:
            im = _reopen(data, uri)
        except DecodeError:
            im = None
        if im is None:
            raise _failure(uri, exc) from exc
    except Image.UnidentifiedImageError as exc:
        # PIL says "cannot identify" also when a known signature is followed by a cut or broken header.
        im = _reopen(data, uri)
        if im is None:
            raise _unidentified(data, uri, exc) from exc
    except MemoryError:
        raise
    except Exception as exc:
        raise _failure(uri, exc) from exc
    width, height = im.size
    if width <= 0 or height <= 0:
        raise DecodeError(uri, "corrupt", f"header gives an empty size {width}x{height}")
    return im


def _header_orientation(im: ImageFile.ImageFile) -> int:
    """EXIF orientation (1..8) readable without decoding pixels; 1 when absent or unreadable."""
    if im.format == "PNG" and "exif" not in im.info:
        return 1  # PNG getexif() would decode the pixels to look for an eXIf chunk after the image data
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def read_header_size(data: bytes, uri: str = "<bytes>") -> tuple[int, int]:
    """(height, width) from the header alone, after EXIF orientation (orientations 5-8 swap the sides).

    Applies no pixel limit, so it also reports the size of images that `decode_image` would reject as
    ``too_large``. For PNG, an eXIf chunk placed after the pixel data is not seen.
    """
    im = _open(data, uri)
    width, height = im.size
    if _header_orientation(im) in (5, 6, 7, 8):
        width, height = height, width
    return height, width


def _composite_over_white(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 straight alpha -> (H, W, 3) uint8 over a white background, rounded."""
    rgb = rgba[..., :3].astype(np.uint32)
    alpha = rgba[..., 3:4].astype(np.uint32)
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def _float_to_u8(arr: np.ndarray) -> np.ndarray:
    """Float image -> uint8: clipped when the data fits 0..255, else min-max normalised; NaN -> lowest value."""
    arr = arr.astype(np.float64)
    finite = np.isfinite(arr)
    if not finite.any():
        return np.zeros(arr.shape, dtype=np.uint8)
    lo, hi = float(arr[finite].min()), float(arr[finite].max())
    arr = np.clip(np.where(np.isnan(arr), lo, arr), lo, hi)  # +-inf clip to the finite range
    if hi <= 255:
        out = np.clip(arr, 0, 255)
    elif hi > lo:
        out = (arr - lo) * (255.0 / (hi - lo))
    else:
        out = np.full(arr.shape, 255.0)  # constant image above 255: saturated
    return np.rint(out).astype(np.uint8)


def _to_rgb(im: Image.Image, uri: str) -> np.ndarray:
    """Decoded PIL image of any supported mode -> (H, W, 3) uint8 RGB, C-contiguous and writable."""
    mode = im.mode
    if mode in _SIXTEEN_BIT_MODES:
        # 16-bit grey (and mode I, treated as 16-bit): clip to 0..65535, keep the high byte.
        grey = (np.clip(np.asarray(im).astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
    elif mode == "F":
        grey = _float_to_u8(np.asarray(im))
    else:
        grey = None
    if grey is not None:
        return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))
    try:
        if im.has_transparency_data:  # alpha channel, RGBA palette or a "transparency" key (P, L, RGB)
            out = _composite_over_white(np.asarray(im.convert("RGBA")))
        elif mode == "RGB":
            out = np.array(im, dtype=np.uint8)
        else:  # L, 1, P, CMYK (incl. Adobe-inverted JPEG), YCbCr, LAB, HSV, RGBX, ...
            out = np.array(im.convert("RGB"), dtype=np.uint8)
    except ValueError as exc:  # PIL: "conversion from X to Y not supported"
        raise DecodeError(uri, "unsupported_mode", f"cannot convert mode {mode!r} to RGB ({exc})") from exc
    if out.ndim != 3 or out.shape[2] != 3:
        raise DecodeError(uri, "unsupported_mode", f"mode {mode!r} gave an array of shape {out.shape}")
    return np.require(out, dtype=np.uint8, requirements=["C", "W"])


def decode_image(data: bytes, uri: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """(H, W, 3) uint8 RGB, C-contiguous, after EXIF orientation.

    `max_pixels` is checked against the header before any pixel is decoded. Multi-frame files give their
    first frame; transparency is composited over white; 16-bit grey keeps the high byte. An unreadable EXIF
    block is ignored (no orientation). Raises DecodeError for bad bytes (MemoryError passes through).
    Truncated files are rejected unless a caller has set PIL's global `ImageFile.LOAD_TRUNCATED_IMAGES`.
    """
    im = _open(data, uri)
    width, height = im.size
    if width * height > max_pixels:
        raise DecodeError(uri, "too_large", f"{width}x{height} = {width * height} pixels exceeds {max_pixels}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im.load()
    except MemoryError:
        raise
    except Exception as exc:
        raise _failure(uri, exc) from exc
    try:
        ImageOps.exif_transpose(im, in_place=True)
    except MemoryError:
        raise
    except Exception:
        pass  # malformed EXIF: keep the stored orientation rather than fail on metadata
    try:
        return _to_rgb(im, uri)
    except (DecodeError, MemoryError):
        raise
    except Exception as exc:
        raise _failure(uri, exc) from exc


def check_rgb_u8(image: np.ndarray, name: str) -> None:
    """ValueError naming `name` unless `image` is a non-empty (H, W, 3) uint8 array."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"{name}: expected an (H, W, 3) uint8 array, got {got}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name}: image is empty, shape {image.shape}")


def resize_long_side(image: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """Resize (H, W, 3) uint8 so max(H, W) == size, keeping the aspect ratio; returns (image, scale).

    `scale` = size / old long side (the factor mapping old pixel coordinates to new ones); small images are
    upscaled. The short side is rounded half up and is at least 1. PIL bilinear (antialiased when shrinking).
    """
    check_rgb_u8(image, "resize_long_side")
    if int(size) != size or size < 1:
        raise ValueError(f"resize_long_side: size must be a positive integer, got {size!r}")
    size = int(size)
    h, w = image.shape[:2]
    long_side = max(h, w)
    scale = size / long_side
    if h >= w:
        new_h, new_w = size, max(1, (2 * w * size + long_side) // (2 * long_side))
    else:
        new_h, new_w = max(1, (2 * h * size + long_side) // (2 * long_side)), size
    if (new_h, new_w) == (h, w):
        return np.array(image, order="C"), scale
    pil = Image.fromarray(np.ascontiguousarray(image))
    resized = pil.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=None)
    return np.array(resized, dtype=np.uint8), scale


def pad_to_square(image: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad (h, w, 3) at the bottom/right to (size, size, 3), dtype kept; ValueError if h or w > size.

    (h, w) and other channel counts are padded the same way.
    """
    if not isinstance(image, np.ndarray) or image.ndim not in (2, 3):
        got = image.shape if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"pad_to_square: expected an (h, w, C) or (h, w) array, got {got}")
    h, w = image.shape[:2]
    if h > size or w > size:
        raise ValueError(f"pad_to_square: image of shape {image.shape} does not fit in {size}x{size}")
    out = np.zeros((size, size) + image.shape[2:], dtype=image.dtype)
    out[:h, :w] = image
    return out


def _encodable(image: np.ndarray, name: str) -> Image.Image:
    ok_shape = isinstance(image, np.ndarray) and (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3))
    if not ok_shape or image.dtype != np.uint8 or 0 in image.shape[:2]:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"{name}: expected a non-empty (H, W, 3) or (H, W) uint8 array, got {got}")
    return Image.fromarray(np.ascontiguousarray(image))


def encode_png(image: np.ndarray, compress_level: int = 6) -> bytes:
    """(H, W, 3) RGB or (H, W) grey uint8 -> lossless PNG bytes (zlib `compress_level` 0-9: 1 is fastest)."""
    buf = io.BytesIO()
    _encodable(image, "encode_png").save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def encode_jpeg(image: np.ndarray, quality: int = 90, subsample: bool = True) -> bytes:
    """(H, W, 3) RGB or (H, W) grey uint8 -> JPEG bytes; `quality` in 1..100; `subsample`: PIL's default chroma
    subsampling (False: full-resolution colour, which keeps thin coloured lines sharp)."""
    if int(quality) != quality or not 1 <= quality <= 100:
        raise ValueError(f"encode_jpeg: quality must be an integer in 1..100, got {quality!r}")
    buf = io.BytesIO()
    extra = {} if subsample else {"subsampling": 0}
    _encodable(image, "encode_jpeg").save(buf, format="JPEG", quality=int(quality), **extra)
    return buf.getvalue()
