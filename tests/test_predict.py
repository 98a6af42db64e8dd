"""Tests for digits.predict: finding, loading and MNIST-style preprocessing of user images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from digits import predict
from digits.predict import ImageError

CENTRE = 14.0

# A "4" in unit coordinates: lopsided on purpose, so centring by bounding box and centring by
# centre of mass give different answers.
FOUR = [[(0.6, 0.0), (0.05, 0.65), (0.95, 0.65)], [(0.7, 0.1), (0.7, 1.0)]]


def draw_four(shape, box, ink=255, paper=0, width=3):
    """uint8-valued PIL image (H, W) = shape with a "4" drawn inside box = (x0, y0, x1, y1)."""
    img = Image.new("L", (shape[1], shape[0]), paper)
    x0, y0, x1, y1 = box
    draw = ImageDraw.Draw(img)
    for stroke in FOUR:
        points = [(x0 + u * (x1 - x0), y0 + v * (y1 - y0)) for u, v in stroke]
        draw.line(points, fill=ink, width=width, joint="curve")
    return img


def as_float(img):
    return np.asarray(img, np.float32) / 255.0


def centre_of_mass(img):
    """uint8 (28, 28) -> (row, col) of the ink centre of mass."""
    mass = img.astype(np.float64)
    idx = np.arange(img.shape[0])
    return mass.sum(1) @ idx / mass.sum(), mass.sum(0) @ idx / mass.sum()


def ink_extent(img):
    """uint8 (28, 28) -> (height, width) of the bounding box of nonzero pixels."""
    rows, cols = np.nonzero(img)
    return rows.max() - rows.min() + 1, cols.max() - cols.min() + 1


def shift_tolerant_corr(a, b):
    """Best correlation over +-1 px shifts: whole-pixel centring may round either way."""
    b = b.astype(np.float64).ravel()
    return max(
        np.corrcoef(np.roll(a, (dy, dx), (0, 1)).astype(np.float64).ravel(), b)[0, 1]
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
    )


def assert_mnist_like(img):
    assert img.dtype == np.uint8 and img.shape == (28, 28)
    assert img.max() == 255  # stroke cores saturate, as in MNIST
    assert max(ink_extent(img)) == 20  # fills the 20x20 box along its longer side
    com = centre_of_mass(img)
    assert abs(com[0] - CENTRE) <= 1 and abs(com[1] - CENTRE) <= 1, com


@pytest.fixture
def mnist_four():
    """A small MNIST-like float array (28, 28): a "4" drawn inside the central 20x20 box."""
    return as_float(draw_four((28, 28), (4, 4, 23, 23), width=2))


# ---------------------------------------------------------------------------- to_mnist


def test_to_mnist_output_is_mnist_like(mnist_four):
    out = predict.to_mnist(mnist_four)
    assert_mnist_like(out)
    assert out[0].max() == out[-1].max() == out[:, 0].max() == out[:, -1].max() == 0


def test_polarity_does_not_matter(tmp_path):
    white_on_black = draw_four((90, 120), (30, 10, 80, 75), ink=255, paper=0, width=6)
    black_on_white = draw_four((90, 120), (30, 10, 80, 75), ink=0, paper=255, width=6)
    white_on_black.save(tmp_path / "wob.png")
    black_on_white.save(tmp_path / "bow.png")
    a = predict.preprocess_file(tmp_path / "wob.png")
    b = predict.preprocess_file(tmp_path / "bow.png")
    assert_mnist_like(a)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 2


def test_rescaled_off_centre_digit_matches_original(mnist_four):
    reference = predict.to_mnist(mnist_four)
    big = Image.fromarray(np.uint8(mnist_four * 255)).resize((84, 84), Image.Resampling.BILINEAR)
    canvas = np.zeros((150, 200), np.float32)  # 200 wide, 150 tall; digit near a corner
    canvas[60:144, 110:194] = as_float(big)
    out = predict.to_mnist(1.0 - canvas)  # and black on white, for good measure
    assert_mnist_like(out)
    assert shift_tolerant_corr(out, reference) > 0.9


def test_gray_paper_noise_and_dust_are_ignored(mnist_four):
    reference = predict.to_mnist(mnist_four)
    rng = np.random.default_rng(0)
    big = as_float(Image.fromarray(np.uint8(mnist_four * 255)).resize((112, 112)))
    photo = 0.8 - 0.55 * np.pad(big, ((20, 30), (50, 10)))  # dark pencil on gray paper
    photo += rng.normal(0.0, 0.02, photo.shape)
    photo[[3, 100, 150], [5, 170, 2]] = 0.0  # isolated dust specks far from the digit
    out = predict.to_mnist(np.clip(photo, 0.0, 1.0))
    assert_mnist_like(out)
    assert shift_tolerant_corr(out, reference) > 0.9


def test_to_mnist_is_stable_on_its_own_output(mnist_four):
    once = predict.to_mnist(mnist_four)
    twice = predict.to_mnist(once / 255.0)
    assert shift_tolerant_corr(twice, once) > 0.98


def test_aspect_ratio_is_kept():
    bar = np.zeros((100, 100), np.float32)
    bar[10:90, 45:55] = 1.0  # an 8:1 vertical bar, like a "1"
    out = predict.to_mnist(bar)
    height, width = ink_extent(out)
    assert height == 20 and width <= 4


def test_blank_image_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="no ink"):
        predict.to_mnist(np.full((40, 40), 0.97, np.float32))
    path = tmp_path / "blank.png"
    Image.new("L", (40, 30), 250).save(path)
    with pytest.raises(ImageError, match="no ink") as info:
        predict.preprocess_file(path)
    assert str(info.value).startswith(f"{path}: ")


def test_to_mnist_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        predict.to_mnist(np.zeros((28, 28, 3), np.float32))


# ---------------------------------------------------------------------------- loading


def test_load_grayscale_rgb_range_and_shape(tmp_path):
    img = Image.new("RGB", (30, 20), (255, 255, 255))
    img.putpixel((3, 4), (0, 0, 0))
    img.save(tmp_path / "rgb.png")
    gray = predict.load_grayscale(tmp_path / "rgb.png")
    assert gray.dtype == np.float32 and gray.shape == (20, 30)
    assert gray[4, 3] == 0.0 and gray.max() == 1.0


def test_rgba_transparent_background_becomes_paper(tmp_path):
    # Transparent pixels hold black RGB here: a naive convert("L") would give a black square.
    alpha = draw_four((90, 120), (30, 10, 80, 75), width=6)
    rgba = Image.merge("RGBA", [Image.new("L", alpha.size, 0)] * 3 + [alpha])
    rgba.save(tmp_path / "rgba.png")
    draw_four((90, 120), (30, 10, 80, 75), ink=0, paper=255, width=6).save(tmp_path / "l.png")
    gray = predict.load_grayscale(tmp_path / "rgba.png")
    assert np.median(gray) == 1.0  # background composited onto white
    out = predict.preprocess_file(tmp_path / "rgba.png")
    assert np.abs(out.astype(int) - predict.preprocess_file(tmp_path / "l.png")).max() <= 2


@pytest.mark.parametrize("name", ["p.png", "p.gif", "p_transparent.png"])
def test_palette_images(tmp_path, name):
    gray = draw_four((90, 120), (30, 10, 80, 75), ink=0, paper=255, width=6)
    pal = gray.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    # Marking the paper colour transparent must still leave white paper after loading.
    extra = {"transparency": pal.getpixel((0, 0))} if "transparent" in name else {}
    pal.save(tmp_path / name, **extra)
    with Image.open(tmp_path / name) as saved:
        assert saved.mode == "P" and ("transparency" in saved.info) == bool(extra)
    expected = predict.to_mnist(as_float(gray))
    out = predict.preprocess_file(tmp_path / name)
    assert np.abs(out.astype(int) - expected).max() <= 8


def test_16bit_png_keeps_its_range(tmp_path):
    # Mid-gray levels: clipping 16-bit values into 8 bits would turn all of them white.
    eight = np.asarray(draw_four((90, 120), (30, 10, 80, 75), ink=40, paper=170, width=6))
    sixteen = eight.astype(np.uint16) * 257
    Image.fromarray(sixteen).save(tmp_path / "deep.png")
    gray = predict.load_grayscale(tmp_path / "deep.png")
    np.testing.assert_allclose(gray, eight / 255.0, atol=1e-6)
    np.testing.assert_array_equal(
        predict.preprocess_file(tmp_path / "deep.png"), predict.to_mnist(eight / 255.0)
    )


def check_one_line_error(path, reason):
    with pytest.raises(ImageError) as info:
        predict.load_grayscale(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and reason in message
    assert "\n" not in message and info.value.path == str(path)


def test_not_an_image_file(tmp_path):
    path = tmp_path / "photo.png"
    path.write_text("hello, I am text\nwith two lines\n")
    with pytest.raises(ImageError) as info:
        predict.load_grayscale(path)
    assert str(info.value) == f"{path}: not an image file (cannot identify image format)"


def test_empty_file(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError) as info:
        predict.load_grayscale(path)
    assert str(info.value) == f"{path}: empty file"


def test_truncated_file(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:600])
    check_one_line_error(path, "truncated or corrupt")


def test_permission_denied(tmp_path, monkeypatch):
    # Simulated: chmod does not stop root, and tests often run as root in containers.
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    path = tmp_path / "y.png"
    Image.new("L", (8, 8)).save(path)
    monkeypatch.setattr(predict.Image, "open", refuse)
    with pytest.raises(ImageError) as info:
        predict.load_grayscale(path)
    assert str(info.value) == f"{path}: unreadable (permission denied)"


def test_missing_file(tmp_path):
    check_one_line_error(tmp_path / "nope.png", "no such file")


# ---------------------------------------------------------------------------- find_images


def test_find_images_expands_folders_in_order(tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    for name in ["b.png", "a.JPG", "c.TiFf", "notes.txt", ".hidden.png"]:
        (folder / name).write_bytes(b"x")
    (folder / "sub.png").mkdir()  # a folder, even if named like an image
    single = tmp_path / "z.png"
    single.write_bytes(b"x")
    found = predict.find_images(f"{single}, {folder},{folder / 'b.png'},")
    assert found == [single, folder / "a.JPG", folder / "b.png", folder / "c.TiFf"]


def test_find_images_keeps_named_files_of_any_suffix(tmp_path):
    path = tmp_path / "digit.dat"
    path.write_bytes(b"x")
    assert predict.find_images(str(path)) == [path]


def test_find_images_missing_path(tmp_path):
    good = tmp_path / "a.png"
    good.write_bytes(b"x")
    with pytest.raises(ImageError, match="no such file") as info:
        predict.find_images(f"{good},{tmp_path / 'missing.png'}")
    assert str(info.value).startswith(f"{tmp_path / 'missing.png'}: ")


def test_find_images_rejects_folder_without_images_and_empty_spec(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(ImageError, match="no image files"):
        predict.find_images(str(tmp_path))
    with pytest.raises(ImageError, match="no files or folders"):
        predict.find_images(" , ")


# ---------------------------------------------------------------------------- predict_files


class FakeModel:
    """predict_fn stand-in: records its calls; class i gets probability mass by row order."""

    def __init__(self, num_classes=10):
        self.calls = []
        self.num_classes = num_classes

    def __call__(self, images):
        self.calls.append(images)
        probs = np.full((len(images), self.num_classes), 0.02)
        for i in range(len(images)):
            probs[i, (i + 3) % self.num_classes] = 0.6
            probs[i, (i + 5) % self.num_classes] = 0.24
        return probs


def test_predict_files_classifies_good_files_and_reports_bad(tmp_path):
    good = []
    for i, width in enumerate([4, 8]):
        path = tmp_path / f"good{i}.png"
        draw_four((60, 60), (10, 10, 50, 50), width=width).save(path)
        good.append(path)
    text, empty = tmp_path / "text.png", tmp_path / "empty.jpg"
    text.write_text("not an image")
    empty.write_bytes(b"")
    model = FakeModel()
    results, errors = predict.predict_files([good[0], text, empty, good[1]], model)

    assert len(model.calls) == 1  # one batched call, not one per file
    assert model.calls[0].shape == (2, 28, 28) and model.calls[0].dtype == np.uint8
    np.testing.assert_array_equal(model.calls[0][1], predict.preprocess_file(good[1]))
    assert [r["file"] for r in results] == [str(p) for p in good]
    assert [r["prediction"] for r in results] == [3, 4]
    for r in results:
        assert set(r) == {"file", "prediction", "probability", "top_k"}
        assert isinstance(r["prediction"], int) and isinstance(r["probability"], float)
        assert r["probability"] == pytest.approx(0.6)
        assert len(r["top_k"]) == 3 and r["top_k"][0] == [r["prediction"], r["probability"]]
        assert [p for _, p in r["top_k"]] == sorted((p for _, p in r["top_k"]), reverse=True)
    assert len(errors) == 2
    assert errors[0].startswith(f"{text}: not an image file")
    assert errors[1] == f"{empty}: empty file"
    assert all("\n" not in e for e in errors)


def test_predict_files_all_bad_does_not_call_model(tmp_path):
    path = tmp_path / "bad.png"
    path.write_bytes(b"")
    model = FakeModel()
    results, errors = predict.predict_files([path], model)
    assert results == [] and model.calls == [] and errors == [f"{path}: empty file"]


def test_predict_files_checks_predict_fn_shape(tmp_path):
    path = tmp_path / "d.png"
    draw_four((40, 40), (5, 5, 35, 35)).save(path)
    with pytest.raises(ValueError, match="shape"):
        predict.predict_files([path], lambda images: np.ones(10))


def test_format_table_lists_every_file():
    results = [
        {"file": "a/one.png", "prediction": 1, "probability": 0.9,
         "top_k": [[1, 0.9], [7, 0.05], [4, 0.03]]},
        {"file": "a_much_longer_name.jpg", "prediction": 8, "probability": 0.5,
         "top_k": [[8, 0.5], [3, 0.3], [0, 0.1]]},
    ]
    lines = predict.format_table(results).splitlines()
    assert len(lines) == 3
    assert lines[0].split() == ["file", "digit", "prob", "top-3"]
    assert "a/one.png" in lines[1] and "1:0.90" in lines[1] and "0.900" in lines[1]
    assert "a_much_longer_name.jpg" in lines[2] and " 8 " in lines[2] and "3:0.30" in lines[2]
    # Columns line up: the probability column starts at the same offset on every row.
    assert lines[1].index("0.900") == lines[2].index("0.500")


def test_save_preprocessed_round_trips(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (3, 28, 28), np.uint8)
    paths = ["in/one.png", "in/two.jpg", "other/one.bmp"]  # two share the stem "one"
    written = predict.save_preprocessed(images, paths, tmp_path / "out")
    assert [p.name for p in written] == ["one_28x28.png", "two_28x28.png", "one_2_28x28.png"]
    for image, path in zip(images, written, strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(path)), image)


# ---------------------------------------------------------------------------- rendered digits


def test_rendered_font_digits_are_centred_and_fit_the_box():
    # Real glyph shapes, model-agnostic: every digit 0-9 in two sizes, placements and polarities.
    font = ImageFont.load_default(size=120)
    upscale = 1 if isinstance(font, ImageFont.FreeTypeFont) else 10  # bitmap font fallback
    outputs = {}
    for digit in range(10):
        for variant, (size, origin, ink, paper) in enumerate(
            [((160, 220), (20, 10), 0, 255), ((300, 260), (150, 120), 230, 30)]
        ):
            img = Image.new("L", (size[1] // upscale, size[0] // upscale), paper)
            ImageDraw.Draw(img).text(
                (origin[0] // upscale, origin[1] // upscale), str(digit), fill=ink, font=font
            )
            img = img.resize((size[1], size[0]), Image.Resampling.NEAREST)
            gray = np.asarray(img, np.float32) / 255.0
            out = predict.to_mnist(gray)
            rows, cols = np.nonzero(out)
            height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
            # The glyph's aspect ratio survives the 20x20 fit (a "1" stays narrow).
            rows, cols = np.nonzero(np.abs(gray - paper / 255.0) > 0.5 * abs(ink - paper) / 255.0)
            aspect = (cols.max() - cols.min() + 1) / (rows.max() - rows.min() + 1)
            assert abs(width / height - aspect) < 0.15, (digit, variant, width / height, aspect)
            mass = out.astype(np.float64)
            com_row = mass.sum(1) @ np.arange(28) / mass.sum()
            com_col = mass.sum(0) @ np.arange(28) / mass.sum()
            assert abs(com_row - 14) <= 1 and abs(com_col - 14) <= 1, (digit, variant)
            assert height <= 20 and width <= 20 and max(height, width) == 20, (digit, variant)
            outputs[digit, variant] = out
    assert len(outputs) == 20
    # Same glyph, different size/position/polarity -> nearly the same 28x28.
    for digit in range(10):
        a, b = outputs[digit, 0].astype(np.float64), outputs[digit, 1].astype(np.float64)
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9, digit
