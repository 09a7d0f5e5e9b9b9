"""Tests for roiqa.io.imageio: every input is built in memory with PIL, every check has an independent reference."""

from __future__ import annotations

import io
import pickle
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from roiqa.io.imageio import (
    ACCEPTED_FORMATS,
    DEFAULT_MAX_PIXELS,
    DecodeError,
    _to_rgb,
    decode_image,
    encode_jpeg,
    encode_png,
    pad_to_square,
    read_header_size,
    resize_long_side,
)

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def save(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def random_rgb(h: int = 24, w: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def smooth_rgb(h: int = 32, w: int = 48) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), np.full_like(x, 128)], axis=2).astype(np.uint8)


def reason_of(data: bytes, **kwargs) -> str:
    with pytest.raises(DecodeError) as info:
        decode_image(data, uri="mem://x", **kwargs)
    return info.value.reason


def check_output(out: np.ndarray, shape: tuple[int, int]) -> None:
    assert out.shape == (*shape, 3) and out.dtype == np.uint8
    assert out.flags.c_contiguous and out.flags.writeable


# ---------------------------------------------------------------- modes


def test_png_round_trip_is_exact():
    src = random_rgb()
    out = decode_image(save(Image.fromarray(src), "PNG"))
    check_output(out, (24, 40))
    np.testing.assert_array_equal(out, src)


def test_jpeg_round_trip_is_close():
    src = smooth_rgb()
    out = decode_image(save(Image.fromarray(src), "JPEG", quality=95))
    check_output(out, (32, 48))
    assert np.abs(out.astype(int) - src.astype(int)).mean() < 3


def test_grayscale_gives_three_equal_channels():
    src = random_rgb()[..., 0]
    out = decode_image(save(Image.fromarray(src, mode="L"), "PNG"))
    check_output(out, src.shape)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], src)


def test_bilevel_gives_black_and_white():
    src = np.array([[0, 1], [1, 0]], dtype=bool)
    out = decode_image(save(Image.fromarray(src).convert("1"), "PNG"))
    np.testing.assert_array_equal(out, np.repeat(src[..., None] * 255, 3, axis=2))


def test_rgba_is_composited_over_white():
    src = np.zeros((2, 3, 4), dtype=np.uint8)
    src[0, 0] = (10, 20, 30, 0)  # fully transparent -> white
    src[0, 1] = (10, 20, 30, 255)  # opaque -> the colour
    src[0, 2] = (200, 100, 0, 128)
    src[1] = (0, 0, 255, 64)
    out = decode_image(save(Image.fromarray(src, mode="RGBA"), "PNG"))
    check_output(out, (2, 3))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (10, 20, 30)
    alpha = src[..., 3:4] / 255.0
    expected = src[..., :3] * alpha + 255.0 * (1.0 - alpha)
    assert np.abs(out - expected).max() <= 0.5 + 1e-9


def test_grey_alpha_is_composited_over_white():
    src = np.array([[[100, 0], [100, 255]]], dtype=np.uint8)
    out = decode_image(save(Image.fromarray(src, mode="LA"), "PNG"))
    np.testing.assert_array_equal(out[0, :, 0], [255, 100])
    assert (out == out[..., :1]).all()


def test_sixteen_bit_png_keeps_high_byte():
    arr = np.array([[0, 255, 256, 257], [4095, 32768, 65280, 65535]], dtype=np.uint16)
    arr = np.concatenate([arr, np.random.default_rng(1).integers(0, 65536, (6, 4), dtype=np.uint16)])
    data = save(Image.fromarray(arr), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = decode_image(data)
    check_output(out, arr.shape)
    expected = (arr >> 8).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], expected)
    assert out[0, 2, 0] == 1 and out[1, 3, 0] == 255


def test_mode_i_is_treated_as_sixteen_bit_and_clipped():
    arr = np.array([[-5, 0, 300, 65535, 70000]], dtype=np.int32)
    data = save(Image.fromarray(arr), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    np.testing.assert_array_equal(decode_image(data)[0, :, 0], [0, 0, 1, 255, 255])


def test_float_image_clipped_or_normalised():
    small = np.array([[-3.0, 0.4, 127.6, 300.0]], dtype=np.float32)  # max > 255: min-max normalise
    data = save(Image.fromarray(small), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    expected = np.rint((small - small.min()) / (small.max() - small.min()) * 255)
    np.testing.assert_array_equal(decode_image(data)[0, :, 0], expected[0])
    in_range = np.array([[-3.0, 0.4, 127.6, 255.0]], dtype=np.float32)  # max <= 255: clip
    np.testing.assert_array_equal(decode_image(save(Image.fromarray(in_range), "TIFF"))[0, :, 0], [0, 0, 128, 255])


def test_cmyk_jpeg_pure_cyan():
    data = save(Image.new("CMYK", (16, 16), (255, 0, 0, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode_image(data)
    check_output(out, (16, 16))
    r, g, b = out.reshape(-1, 3).mean(axis=0)
    assert r < 30 and g > 225 and b > 225


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency(fmt):
    im = Image.new("P", (3, 2), 0)
    im.putpalette([*BLUE, *GREEN, *RED])
    im.putpixel((1, 0), 1)
    im.putpixel((2, 1), 2)
    data = save(im, fmt, transparency=0)
    assert Image.open(io.BytesIO(data)).mode == "P"
    out = decode_image(data)
    expected = np.full((2, 3, 3), 255, dtype=np.uint8)  # index 0 is transparent -> white
    expected[0, 1], expected[1, 2] = GREEN, RED
    np.testing.assert_array_equal(out, expected)


def test_palette_without_transparency():
    im = Image.new("P", (2, 1), 0)
    im.putpalette([*BLUE, *RED])
    im.putpixel((1, 0), 1)
    np.testing.assert_array_equal(decode_image(save(im, "PNG")), [[BLUE, RED]])


def test_multi_frame_gif_gives_first_frame():
    frames = [Image.new("RGB", (4, 4), colour) for colour in (RED, GREEN, BLUE)]
    data = save(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    np.testing.assert_array_equal(decode_image(data), np.full((4, 4, 3), RED, dtype=np.uint8))


def test_exif_orientation_6_rotates_clockwise():
    src = np.zeros((32, 48, 3), dtype=np.uint8)  # H=32, W=48; left half red, right half blue
    src[:, :24] = RED
    src[:, 24:] = BLUE
    im = Image.fromarray(src)
    exif = im.getexif()
    exif[0x0112] = 6
    data = save(im, "JPEG", exif=exif, quality=95, subsampling=0)
    assert Image.open(io.BytesIO(data)).getexif()[0x0112] == 6
    out = decode_image(data)
    check_output(out, (48, 32))
    # Orientation 6: the stored image must be turned 90 degrees clockwise for display (left edge -> top).
    expected = np.rot90(src, k=-1)
    assert np.abs(out.astype(int) - expected.astype(int)).max() < 40
    assert (out[:24, :, 0] > 200).all() and (out[24:, :, 2] > 200).all()
    assert read_header_size(data) == (48, 32)


def test_unconvertible_mode_is_unsupported_mode():
    with pytest.raises(DecodeError) as info:
        _to_rgb(Image.new("La", (2, 2)), "mem://la")
    assert info.value.reason == "unsupported_mode" and "La" in str(info.value)


# ---------------------------------------------------------------- failures


def test_empty_file():
    assert reason_of(b"") == "empty_file"


def test_text_is_not_an_image():
    assert reason_of(b"this is a text file named photo.jpg\n" * 10) == "not_an_image"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_cut_in_half_is_truncated(fmt):
    data = save(Image.fromarray(random_rgb(64, 80)), fmt)
    # PIL reports both as OSError "image file is truncated ..." during load(): mapped to `truncated`.
    assert reason_of(data[: len(data) // 2]) == "truncated"
    for cut in (20, 30, 40):  # cut inside the header: PIL cannot identify it, the PNG/JPEG parser ran out
        assert reason_of(data[:cut]) == "truncated"


def test_damaged_png_data_is_corrupt():
    data = bytearray(save(Image.fromarray(random_rgb(64, 80)), "PNG"))
    at = data.find(b"IDAT") + 40
    data[at : at + 8] = b"\xff" * 8
    with pytest.raises(DecodeError) as info:
        decode_image(bytes(data), uri="mem://bad.png")
    assert info.value.reason == "corrupt" and "broken data stream" in info.value.message


def test_bad_png_header_checksum_is_corrupt():
    data = bytearray(save(Image.new("RGB", (4, 4)), "PNG"))
    data[29] ^= 0xFF  # first byte of the IHDR CRC
    with pytest.raises(Image.UnidentifiedImageError):
        Image.open(io.BytesIO(bytes(data)))
    assert reason_of(bytes(data)) == "corrupt"


def png_claiming(width: int, height: int) -> bytes:
    """A valid small PNG whose IHDR (with a correct CRC) claims width x height pixels."""
    data = bytearray(save(Image.new("RGB", (4, 4), RED), "PNG"))
    assert data[12:16] == b"IHDR"
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_huge_header_is_too_large_without_decoding():
    data = png_claiming(100_000, 100_000)
    start = time.perf_counter()
    assert reason_of(data) == "too_large"
    assert time.perf_counter() - start < 1.0  # 10^10 RGB pixels could never be decoded this fast
    assert read_header_size(data) == (100_000, 100_000)
    assert Image.MAX_IMAGE_PIXELS is not None  # the PIL global was left alone


def test_own_pixel_limit_applies_from_header():
    for width, height in [(20_000, 10_000), (12_000, 10_000)]:  # over PIL's hard ceiling; only over its warning
        data = png_claiming(width, height)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # PIL's DecompressionBombWarning must not leak
            assert reason_of(data) == "too_large"
            assert read_header_size(data) == (height, width)
        assert width * height > DEFAULT_MAX_PIXELS
    small = save(Image.new("RGB", (10, 10)), "PNG")
    assert reason_of(small, max_pixels=99) == "too_large"
    assert decode_image(small, max_pixels=100).shape == (10, 10, 3)


def test_pil_truncation_global_not_enabled():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_decode_error_names_uri_and_pickles():
    with pytest.raises(DecodeError) as info:
        decode_image(b"", uri="s3://bucket/a.jpg")
    err = info.value
    assert isinstance(err, ValueError)
    assert str(err) == "s3://bucket/a.jpg: empty_file: zero bytes"
    assert err.uri == "s3://bucket/a.jpg"
    again = pickle.loads(pickle.dumps(err))
    assert (again.uri, again.reason, str(again)) == (err.uri, err.reason, str(err))


def test_read_header_size_plain():
    assert read_header_size(save(Image.new("RGB", (7, 5)), "JPEG")) == (5, 7)
    with pytest.raises(DecodeError, match="mem://t.txt: not_an_image"):
        read_header_size(b"hello", uri="mem://t.txt")


# ---------------------------------------------------------------- geometry and encoding


@pytest.mark.parametrize(("shape", "expected"), [((500, 1000), (100, 200)), ((1000, 500), (200, 100))])
def test_resize_long_side_down(shape, expected):
    image = np.full((*shape, 3), (10, 200, 30), dtype=np.uint8)
    out, scale = resize_long_side(image, 200)
    assert out.shape == (*expected, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    assert scale == pytest.approx(0.2)
    assert (out == (10, 200, 30)).all()


def test_resize_long_side_up_and_rounding():
    out, scale = resize_long_side(random_rgb(3, 7), 100)
    assert out.shape == (43, 100, 3) and scale == pytest.approx(100 / 7)  # 3 * 100 / 7 = 42.86
    out, scale = resize_long_side(random_rgb(1, 500), 10)
    assert out.shape == (1, 10, 3) and scale == pytest.approx(0.02)
    with pytest.raises(ValueError):
        resize_long_side(random_rgb()[..., 0], 10)


def test_pad_to_square():
    image = random_rgb(5, 7)
    out = pad_to_square(image, 10)
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:5, :7], image)
    assert not out[5:].any() and not out[:, 7:].any()
    with pytest.raises(ValueError, match="does not fit"):
        pad_to_square(image, 6)


def test_encoders_round_trip():
    rgb = random_rgb()
    np.testing.assert_array_equal(decode_image(encode_png(rgb)), rgb)
    grey = rgb[..., 1]
    np.testing.assert_array_equal(decode_image(encode_png(grey))[..., 0], grey)
    smooth = smooth_rgb()
    jpeg = encode_jpeg(smooth, quality=95)
    assert jpeg[:2] == b"\xff\xd8"
    assert np.abs(decode_image(jpeg).astype(int) - smooth.astype(int)).mean() < 3
    assert len(encode_jpeg(smooth, quality=10)) < len(jpeg)
    with pytest.raises(ValueError):
        encode_png(rgb.astype(np.float32))
    with pytest.raises(ValueError):
        encode_jpeg(rgb, quality=0)


# ---------------------------------------------------------------- accepted formats


def zero_png(width: int, height: int) -> bytes:
    """A 1-bit grey PNG of zeros, compressed row by row (nothing of its size is ever held): 12000 x 12000 is 17 KB."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    z = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def ico_wrapping(png: bytes) -> bytes:
    """An ICO file whose one entry is `png` (Windows Vista icons embed PNGs this way)."""
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 22) + png


def test_an_icon_wrapping_a_huge_png_is_refused_before_any_decoding(tmp_path, run_measured):
    data = ico_wrapping(zero_png(12_000, 12_000))
    assert len(data) < 50_000  # PIL's ICO plugin decodes the embedded PNG while opening: 140 MiB for these pixels
    with pytest.raises(DecodeError) as info:
        decode_image(data, uri="mem://icon.png")
    assert info.value.reason == "unsupported_format" and "ICO" in info.value.message
    path = tmp_path / "icon.png"
    path.write_bytes(data)
    code = (
        "from roiqa.io.imageio import DecodeError, decode_image\ndata = open(sys.argv[1], 'rb').read()\nbefore()\n"
        "try:\n    decode_image(data, sys.argv[1])\nexcept DecodeError as e:\n    reason = e.reason\n"
        "print(json.dumps({'grew_mib': after(), 'reason': reason}))"
    )
    got = run_measured(code, str(path))
    assert got["reason"] == "unsupported_format"
    assert got["grew_mib"] < 30


@pytest.mark.parametrize("fmt", ["ICO", "PPM", "PCX", "SGI", "QOI"])
def test_formats_outside_the_list_are_unsupported_format(fmt):
    data = save(Image.fromarray(random_rgb(8, 8)), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # PIL would decode them
    assert reason_of(data) == "unsupported_format"


@pytest.mark.parametrize("fmt", ACCEPTED_FORMATS)
def test_every_accepted_format_decodes(fmt):
    src = np.zeros((12, 20, 3), dtype=np.uint8)  # three flat colours: exact through GIF's palette too
    src[:, :7], src[:, 7:14], src[:, 14:] = RED, GREEN, BLUE
    options = {"WEBP": {"lossless": True}, "JPEG": {"quality": 95, "subsampling": 0}}.get(fmt, {})
    data = save(Image.fromarray(src), fmt, **options)
    assert Image.open(io.BytesIO(data)).format == fmt
    out = decode_image(data)
    check_output(out, (12, 20))
    assert np.abs(out.astype(int) - src.astype(int)).max() <= (60 if fmt == "JPEG" else 0)


def test_a_jpeg_with_an_mp_extension_decodes_its_first_frame():
    frames = [Image.new("RGB", (16, 8), c) for c in (RED, BLUE)]
    data = save(frames[0], "MPO", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    r, g, b = decode_image(data).reshape(-1, 3).mean(axis=0)
    assert r > 230 and g < 25 and b < 25
