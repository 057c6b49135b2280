"""load_rgb: every PIL mode to 8-bit RGB, each against values worked out by hand (see images.py)."""
import io

import numpy as np
import pytest
import PIL
from PIL import Image

from timm_fmd.train.images import load_rgb, to_rgb


def rgb(img: Image.Image) -> np.ndarray:
    assert img.mode == 'RGB'
    return np.asarray(img)


def gray(img: Image.Image) -> list:
    """The grey levels of an RGB image whose three channels must be equal."""
    a = rgb(img)
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    return a[..., 0].ravel().tolist()


def saved(img: Image.Image, path, **kwargs):
    img.save(path, **kwargs)
    if img.mode == 'YCbCr':  # Pillow before 13 writes an uncompressed YCbCr TIFF it cannot read back (truncated)
        try:
            with Image.open(path) as back:
                back.load()
                readable = back.mode == 'YCbCr'
        except OSError:
            readable = False
        if not readable:
            pytest.skip(f'Pillow {PIL.__version__} cannot read back the YCbCr TIFF it writes (Pillow 13 can)')
    return path


# ------------------------------------------------------------------- integer images of more than 8 bits
SIXTEEN = [1799, 57311, 0, 65535, 128, 129, 32896, 385]
SIXTEEN_BY_HAND = [7, 223, 0, 255, 0, 1, 128, 1]  # v / 257 rounded: 7.0, 223.0, 0, 255, 0.498, 0.502, 128.0, 1.498


def test_16_bit_png_is_scaled_by_257_not_clipped(tmp_path):
    """The issue's image: PIL's own convert('RGB') makes it all white."""
    path = saved(Image.fromarray(np.array([SIXTEEN], dtype=np.uint16)), tmp_path / 'g16.png')
    with Image.open(path) as img:
        assert img.mode == 'I;16'
        assert gray(img.convert('RGB')) == [255, 255, 0, 255, 128, 129, 255, 255]  # what PIL alone does
    assert gray(load_rgb(path)) == SIXTEEN_BY_HAND


def test_16_bit_big_endian_tiff(tmp_path):
    img = Image.frombytes('I;16B', (len(SIXTEEN), 1), np.array(SIXTEEN, dtype='>u2').tobytes())
    path = saved(img, tmp_path / 'g16b.tif')
    with Image.open(path) as back:
        assert back.mode == 'I;16B'
    assert gray(load_rgb(path)) == SIXTEEN_BY_HAND


def test_16_bit_pgm_opens_as_mode_i(tmp_path):
    """Pillow reads a PGM of maxval 4095 as mode I rescaled to 16 bits: 4095 -> 65535 -> 255, 2048 -> 32776 -> 128."""
    path = tmp_path / 'g12.pgm'
    path.write_bytes(b'P5\n4 1\n4095\n' + np.array([0, 4095, 100, 2048], dtype='>u2').tobytes())
    with Image.open(path) as img:
        assert img.mode == 'I' and np.asarray(img).tolist() == [[0, 65535, 1600, 32776]]
    assert gray(load_rgb(path)) == [0, 255, 6, 128]  # 1600 / 257 = 6.23, 32776 / 257 = 127.53


def test_32_bit_tiff_uses_its_bits_per_sample(tmp_path):
    """Mode I TIFF: 32-bit signed samples, so 2**31 - 1 is white and 2**30 is 127.50000006 -> 128."""
    path = saved(Image.fromarray(np.array([[0, 2 ** 31 - 1, 2 ** 30, 8421504]], dtype=np.int32)), tmp_path / 'i32.tif')
    assert gray(load_rgb(path)) == [0, 255, 128, 1]  # 8421504 * 255 / (2**31 - 1) = 0.99998


def test_wide_integers_out_of_range_are_refused_with_the_file_named(tmp_path):
    path = saved(Image.fromarray(np.array([[-5, 300]], dtype=np.int32)), tmp_path / 'signed.tif')
    with pytest.raises(ValueError, match=r"signed.tif.*values -5\.\.300 outside its 31-bit range"):
        load_rgb(path)
    wide = Image.fromarray(np.array([[0, 70000]], dtype=np.int32))  # mode I with no file stating its depth
    with pytest.raises(ValueError, match=r"'wide.png' \(I\) has values 0\.\.70000 outside its 16-bit range 0\.\.65535"):
        to_rgb(wide, 'wide.png')


# -------------------------------------------------------------------------------------- float images
def test_float_tiff_is_taken_as_zero_to_one(tmp_path):
    path = saved(Image.fromarray(np.array([[0.0, 0.5, 1.0, 0.25, 0.002]], dtype=np.float32)), tmp_path / 'f.tif')
    assert gray(load_rgb(path)) == [0, 128, 255, 64, 1]  # 127.5 -> 128, 63.75 -> 64, 0.51 -> 1


@pytest.mark.parametrize('values, found', [([0.0, 1.5], r'0\.\.1\.5'), ([-0.1, 0.5], r'-0\.1\.\.0\.5'),
                                           ([0.5, np.nan], r'0\.5\.\.0\.5 and 1 NaN/inf'),
                                           ([np.inf, np.inf], 'no finite values and 2 NaN/inf')])
def test_float_values_outside_zero_to_one_are_refused(tmp_path, values, found):
    path = saved(Image.fromarray(np.array([values], dtype=np.float32)), tmp_path / 'bad_float.tif')
    with pytest.raises(ValueError, match=rf"bad_float.tif' \(float mode F\) has values {found}; .*\[0, 1\]"):
        load_rgb(path)


# ------------------------------------------------------------------ 8-bit modes: PIL's own conversion
def test_bilevel(tmp_path):
    img = Image.new('1', (3, 1))
    img.putpixel((1, 0), 1)
    assert gray(load_rgb(saved(img, tmp_path / 'b.png'))) == [0, 255, 0]


def test_grayscale(tmp_path):
    path = saved(Image.fromarray(np.array([[0, 17, 255]], dtype=np.uint8)), tmp_path / 'l.png')
    assert gray(load_rgb(path)) == [0, 17, 255]


PALETTE = [10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6)


def test_palette_with_transparency_keeps_the_colour(tmp_path, recwarn):
    img = Image.new('P', (2, 1))
    img.putpalette(PALETTE)
    img.putpixel((1, 0), 1)
    path = saved(img, tmp_path / 'p.png', transparency=b'\x00\xff')  # index 0 fully transparent
    assert rgb(load_rgb(path)).tolist() == [[[10, 20, 30], [200, 100, 50]]]
    assert not [w for w in recwarn if 'Palette images' in str(w.message)]  # the colour is kept on purpose


def test_palette_with_alpha(tmp_path):
    img = Image.new('PA', (2, 1))
    img.putpalette(PALETTE)
    img.putpixel((0, 0), (1, 0))
    img.putpixel((1, 0), (0, 255))
    path = saved(img, tmp_path / 'pa.tif')
    with Image.open(path) as back:
        assert back.mode == 'PA'
    assert rgb(load_rgb(path)).tolist() == [[[200, 100, 50], [10, 20, 30]]]


def test_gray_and_colour_with_alpha_drop_the_alpha(tmp_path):
    la = Image.new('LA', (1, 1), (100, 0))
    assert gray(load_rgb(saved(la, tmp_path / 'la.png'))) == [100]
    rgba = Image.new('RGBA', (1, 1), (200, 100, 50, 0))
    assert rgb(load_rgb(saved(rgba, tmp_path / 'rgba.png'))).tolist() == [[[200, 100, 50]]]
    assert rgb(to_rgb(Image.new('RGBX', (1, 1), (1, 2, 3, 4)))).tolist() == [[[1, 2, 3]]]


def test_premultiplied_alpha_is_undone():
    """La / RGBa store colour x alpha / 255: 100 at alpha 128 is 100 * 255 / 128 = 199.2 -> 199."""
    assert gray(to_rgb(Image.new('La', (1, 1), (100, 128)))) == [199]
    assert rgb(to_rgb(Image.new('RGBa', (1, 1), (100, 50, 0, 128)))).tolist() == [[[199, 99, 0]]]


def test_cmyk(tmp_path):
    """No colour profile: R = (255 - C)(255 - K) / 255, ...: pure cyan-free magenta+yellow is red, K 128 is 127."""
    img = Image.new('CMYK', (2, 1))
    img.putpixel((0, 0), (0, 255, 255, 0))
    img.putpixel((1, 0), (0, 0, 0, 128))
    assert rgb(load_rgb(saved(img, tmp_path / 'cmyk.tif'))).tolist() == [[[255, 0, 0], [127, 127, 127]]]


def test_ycbcr(tmp_path):
    """BT.601: Y 76, Cb 85, Cr 255 -> R = 76 + 1.402 * 127 = 254.1, G = 76 + 0.344 * 43 - 0.714 * 127 = 0.1,
    B = 76 - 1.772 * 43 = -0.2 -> (254, 0, 0)."""
    img = Image.new('YCbCr', (2, 1))
    img.putpixel((0, 0), (76, 85, 255))
    img.putpixel((1, 0), (128, 128, 128))
    path = saved(img, tmp_path / 'ycc.tif')
    with Image.open(path) as back:
        assert back.mode == 'YCbCr'
    assert rgb(load_rgb(path)).tolist() == [[[254, 0, 0], [128, 128, 128]]]


def test_lab(tmp_path):
    """CIE L*a*b* to sRGB: L* = 127 / 255 * 100 = 49.8, a* = b* = 0 is grey with Y = ((49.8 + 16) / 116)^3 =
    0.1812, sRGB 1.055 * Y^(1/2.4) - 0.055 = 0.4628 -> 118; L* 100 is white. PIL is within one level."""
    img = Image.new('LAB', (2, 1))
    img.putpixel((0, 0), (127, 128, 128))
    img.putpixel((1, 0), (255, 128, 128))
    path = saved(img, tmp_path / 'lab.tif')
    with Image.open(path) as back:
        assert back.mode == 'LAB'
    out = rgb(load_rgb(path)).astype(int)
    assert np.abs(out - np.array([[[118] * 3, [255] * 3]])).max() <= 1


def test_hsv():
    """Hue 85 / 255 * 360 = 120 degrees (green) at value 128; hue 0 at full saturation and value is red."""
    img = Image.new('HSV', (2, 1))
    img.putpixel((0, 0), (0, 255, 255))
    img.putpixel((1, 0), (85, 255, 128))
    assert rgb(to_rgb(img)).tolist() == [[[255, 0, 0], [0, 128, 0]]]


@pytest.mark.parametrize('mode', ['1', 'L', 'P', 'LA', 'RGBA', 'CMYK', 'YCbCr', 'RGB'])
def test_eight_bit_modes_equal_what_inference_code_with_timm_gets(tmp_path, mode):
    """timm's reader (and a user's inference code) do Image.open(f).convert('RGB'): for 8-bit modes the same."""
    noise = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    img = Image.fromarray(noise).convert(mode)
    path = saved(img, tmp_path / f'x.{"tif" if mode in ("CMYK", "YCbCr") else "png"}')
    with Image.open(path) as reference:
        assert np.array_equal(rgb(load_rgb(path)), np.asarray(reference.convert('RGB')))


# ---------------------------------------------------------------------- what is deliberately left alone
def test_exif_orientation_is_not_applied(tmp_path):
    """As in timm's reader: the stored pixels, so training and inference see the same image."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = saved(Image.new('RGB', (4, 2), (255, 0, 0)), tmp_path / 'rotated.jpg', exif=exif)
    assert load_rgb(path).size == (4, 2)


def test_multi_frame_gives_the_first_frame(tmp_path):
    frames = [Image.new('L', (2, 2), v) for v in (40, 200)]
    path = tmp_path / 'anim.gif'
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert gray(load_rgb(path)) == [40] * 4


def test_broken_files_name_the_file(tmp_path):
    (tmp_path / 'junk.png').write_bytes(b'not an image')
    with pytest.raises(ValueError, match=r"cannot decode image '.*junk.png': UnidentifiedImageError"):
        load_rgb(tmp_path / 'junk.png')
    whole = io.BytesIO()
    Image.new('RGB', (64, 64), (1, 2, 3)).save(whole, format='PNG')
    (tmp_path / 'cut.png').write_bytes(whole.getvalue()[:60])  # truncated: fails when decoded, not later
    with pytest.raises(ValueError, match=r"cannot decode image 'member.png'"):
        with open(tmp_path / 'cut.png', 'rb') as f:
            load_rgb(f, name='member.png')
