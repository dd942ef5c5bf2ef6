"""decode_image: every PIL mode becomes RGB or L at the asked size, and bad files name themselves."""

import numpy as np
import pytest
from PIL import Image

from vitlab.data import decode_image
from vitlab.errors import DataError


def _rgb(h=6, w=8):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_rgb_png_round_trips_exactly(tmp_path):
    a = _rgb()
    Image.fromarray(a).save(tmp_path / "x.png")
    out = decode_image(tmp_path / "x.png", None, 3)
    assert out.dtype == np.uint8 and out.shape == (3, 6, 8)
    np.testing.assert_array_equal(out, a.transpose(2, 0, 1))


def test_gray_to_rgb_and_rgb_to_gray(tmp_path):
    g = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    Image.fromarray(g, "L").save(tmp_path / "g.png")
    rgb = decode_image(tmp_path / "g.png", None, 3)
    assert rgb.shape == (3, 6, 8)
    for c in range(3):
        np.testing.assert_array_equal(rgb[c], g)
    a = _rgb()
    Image.fromarray(a).save(tmp_path / "c.png")
    gray = decode_image(tmp_path / "c.png", None, 1)
    expected = np.asarray(Image.fromarray(a).convert("L"))
    np.testing.assert_array_equal(gray[0], expected)


def test_rgba_composited_on_white(tmp_path):
    a = np.zeros((2, 2, 4), dtype=np.uint8)
    a[0, 0] = (255, 0, 0, 255)  # opaque red
    a[0, 1] = (0, 0, 0, 0)  # fully transparent: white background
    a[1, 0] = (0, 0, 0, 128)  # half-transparent black: mid grey
    a[1, 1] = (0, 255, 0, 255)
    Image.fromarray(a, "RGBA").save(tmp_path / "a.png")
    out = decode_image(tmp_path / "a.png", None, 3)
    assert out[:, 0, 0].tolist() == [255, 0, 0]
    assert out[:, 0, 1].tolist() == [255, 255, 255]
    assert all(abs(v - 127) <= 1 for v in out[:, 1, 0].tolist())
    assert out[:, 1, 1].tolist() == [0, 255, 0]


def test_palette_and_cmyk(tmp_path):
    a = _rgb()
    p = Image.fromarray(a).convert("P", palette=Image.ADAPTIVE, colors=16)
    p.save(tmp_path / "p.png")
    np.testing.assert_array_equal(decode_image(tmp_path / "p.png", None, 3),
                                  np.asarray(p.convert("RGB")).transpose(2, 0, 1))
    cmyk = Image.fromarray(a).convert("CMYK")
    cmyk.save(tmp_path / "c.tif")
    np.testing.assert_array_equal(decode_image(tmp_path / "c.tif", None, 3),
                                  np.asarray(cmyk.convert("RGB")).transpose(2, 0, 1))


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    a = np.array([[0, 257 * 100], [65535, 257 * 200]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "d.png")
    out = decode_image(tmp_path / "d.png", None, 1)
    assert out[0].tolist() == [[0, 100], [255, 200]]


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((4, 8, 3), dtype=np.uint8)  # 4 high, 8 wide; white marks the top-left corner
    a[:2, :2] = 255
    img = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "r.jpg", exif=exif, quality=100)
    out = decode_image(tmp_path / "r.jpg", None, 3)
    assert out.shape == (3, 8, 4)  # displayed upright: 8 high, 4 wide
    assert out[:, :2, 2:].mean() > 200 and out[:, 6:, :2].mean() < 50  # the corner moved to the top-right


def test_resize_to_target(tmp_path):
    Image.fromarray(np.full((40, 30, 3), 77, np.uint8)).save(tmp_path / "x.png")
    out = decode_image(tmp_path / "x.png", (16, 12), 3)
    assert out.shape == (3, 16, 12)
    assert (out == 77).all()


def test_bad_files_raise_data_error_naming_them(tmp_path):
    (tmp_path / "notes.jpg").write_text("hello, not an image")
    with pytest.raises(DataError, match="notes.jpg: not a readable image"):
        decode_image(tmp_path / "notes.jpg", None, 3)
    Image.fromarray(_rgb(64, 64)).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.jpg: not a readable image"):
        decode_image(tmp_path / "cut.jpg", (32, 32), 3)
    with pytest.raises(DataError, match="missing.png: file not found"):
        decode_image(tmp_path / "missing.png", None, 3)


def test_large_jpeg_downscaled_while_decoding_keeps_content(tmp_path):
    a = np.zeros((480, 640, 3), np.uint8)
    a[:, :320] = (200, 40, 40)  # left half red, right half blue
    a[:, 320:] = (30, 60, 210)
    Image.fromarray(a).save(tmp_path / "big.jpg", quality=95)
    out = decode_image(tmp_path / "big.jpg", (24, 32), 3).astype(int)
    assert out.shape == (3, 24, 32)
    assert np.abs(out[:, :, :14] - np.array([200, 40, 40])[:, None, None]).max() <= 6
    assert np.abs(out[:, :, 18:] - np.array([30, 60, 210])[:, None, None]).max() <= 6
