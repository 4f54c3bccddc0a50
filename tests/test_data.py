"""Tests for hgad_edge.training.data on small generated image folders (plus one real-data smoke test)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from hgad_edge.training.data import (
    BTAD,
    IMAGE_EXTENSIONS,
    LAYOUTS,
    ADDataset,
    DataError,
    MVTec3DRGB,
    MVTecAD,
    Sample,
    UnionDataset,
    VisA,
    load_image,
    load_mask,
    open_dataset,
    open_roots,
    resize_image,
)

H, W = 32, 40


# ------------------------------------------------------------------------------------------
# fixture builders


def write_image(path: Path, value: int = 100, shape: tuple[int, int] = (H, W)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full(shape, value, np.uint8)
    img[: shape[0] // 2] = 255 - value  # not constant, so JPEG has real scan data
    assert cv2.imwrite(str(path), img)
    return path


def write_mask(path: Path, shape: tuple[int, int] = (H, W)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros(shape, np.uint8)
    mask[4:10, 5:12] = 255
    assert cv2.imwrite(str(path), mask)
    return path


def make_mvtec(root: Path, classes: tuple[str, ...] = ("bottle", "cable"), masks: bool = True) -> Path:
    """<class>/train/good (3), test/good (2), test/crack (2), test/scratch (1), masks per defect."""
    for name in classes:
        cls = root / name
        for i in range(3):
            write_image(cls / "train" / "good" / f"{i:03d}.png")
        for i in range(2):
            write_image(cls / "test" / "good" / f"{i:03d}.png")
        for defect, count in (("crack", 2), ("scratch", 1)):
            for i in range(count):
                write_image(cls / "test" / defect / f"{i:03d}.png")
                if masks:
                    write_mask(cls / "ground_truth" / defect / f"{i:03d}_mask.png")
    return root


def make_visa(root: Path) -> Path:
    rows = ["object,split,label,image,mask"]
    for name in ("candle", "pcb1"):
        for i in range(3):
            write_image(root / name / "Data" / "Images" / "Normal" / f"{i:03d}.JPG")
            split = "train" if i < 2 else "test"
            rows.append(f"{name},{split},normal,{name}/Data/Images/Normal/{i:03d}.JPG,")
        for i in range(2):
            write_image(root / name / "Data" / "Images" / "Anomaly" / f"{i:03d}.JPG")
            write_mask(root / name / "Data" / "Masks" / "Anomaly" / f"{i:03d}.png")
            rows.append(
                f"{name},test,anomaly,{name}/Data/Images/Anomaly/{i:03d}.JPG,{name}/Data/Masks/Anomaly/{i:03d}.png"
            )
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    return root


def make_btad(root: Path) -> Path:
    for name, ext in (("01", ".bmp"), ("02", ".png")):
        cls = root / name
        for i in range(2):
            write_image(cls / "train" / "ok" / f"{i:04d}{ext}")
            write_image(cls / "test" / "ok" / f"{i:04d}{ext}")
            write_image(cls / "test" / "ko" / f"{i:04d}{ext}")
        # BTAD mixes '<stem>.png' and '<stem>_mask.png' mask names
        write_mask(cls / "ground_truth" / "ko" / "0000.png")
        write_mask(cls / "ground_truth" / "ko" / "0001_mask.png")
    return root


def make_mvtec3d(root: Path) -> Path:
    cls = root / "bagel"
    for i in range(2):
        write_image(cls / "train" / "good" / "rgb" / f"{i:03d}.png")
        (cls / "train" / "good" / "xyz").mkdir(parents=True, exist_ok=True)
        (cls / "train" / "good" / "xyz" / f"{i:03d}.tiff").write_bytes(b"xyz")
    write_image(cls / "validation" / "good" / "rgb" / "000.png")
    write_image(cls / "test" / "good" / "rgb" / "000.png")
    write_mask(cls / "test" / "good" / "gt" / "000.png")
    for i in range(2):
        write_image(cls / "test" / "crack" / "rgb" / f"{i:03d}.png")
        write_mask(cls / "test" / "crack" / "gt" / f"{i:03d}.png")
    return root


def write_palette_png(path: Path) -> None:
    """A 2x3 8-bit palette PNG built by hand (cv2 cannot write palette images)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    palette = bytes([255, 0, 0, 0, 255, 0, 0, 0, 255])
    rows = b"".join(b"\x00" + bytes(r) for r in ([0, 1, 2], [2, 1, 0]))
    header = struct.pack(">IIBBBBB", 3, 2, 8, 3, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"PLTE", palette)
    path.write_bytes(data + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


# ------------------------------------------------------------------------------------------
# load_image / load_mask / resize_image


def test_load_gray_png_as_rgb(tmp_path: Path) -> None:
    img = load_image(write_image(tmp_path / "g.png", value=100))
    assert img.shape == (H, W, 3) and img.dtype == np.uint8
    assert (img[-1, -1] == 100).all() and (img[0, 0] == 155).all()


def test_load_color_is_rgb(tmp_path: Path) -> None:
    bgr = np.zeros((4, 5, 3), np.uint8)
    bgr[..., 0] = 200  # blue in OpenCV order
    cv2.imwrite(str(tmp_path / "c.png"), bgr)
    img = load_image(tmp_path / "c.png", min_side=1)
    assert img[0, 0].tolist() == [0, 0, 200]


def test_load_16bit_png_rounds(tmp_path: Path) -> None:
    values = np.array([[0, 128, 257, 65535, 1000]], np.uint16)
    cv2.imwrite(str(tmp_path / "d.png"), values)
    img = load_image(tmp_path / "d.png", min_side=1)
    expected = np.round(values / 257).astype(np.uint8)
    assert img.dtype == np.uint8 and img.shape == (1, 5, 3)
    assert (img[..., 0] == expected).all() and img[0, 3, 0] == 255


def test_load_rgba_drops_alpha(tmp_path: Path) -> None:
    bgra = np.zeros((3, 4, 4), np.uint8)
    bgra[..., 2] = 90  # red
    bgra[..., 3] = 0  # fully transparent: alpha must not matter
    cv2.imwrite(str(tmp_path / "a.png"), bgra)
    img = load_image(tmp_path / "a.png", min_side=1)
    assert img.shape == (3, 4, 3) and img[0, 0].tolist() == [90, 0, 0]


def test_load_palette_png(tmp_path: Path) -> None:
    write_palette_png(tmp_path / "p.png")
    img = load_image(tmp_path / "p.png", min_side=1)
    assert img.shape == (2, 3, 3)
    assert img[0, 0].tolist() == [255, 0, 0] and img[0, 2].tolist() == [0, 0, 255]


@pytest.mark.parametrize("ext", [".jpg", ".bmp", ".tif"])
def test_load_other_formats(tmp_path: Path, ext: str) -> None:
    img = load_image(write_image(tmp_path / f"x{ext}"))
    assert img.shape == (H, W, 3) and img.dtype == np.uint8


def test_load_jpeg_with_trailing_bytes(tmp_path: Path) -> None:
    path = write_image(tmp_path / "t.jpg")
    path.write_bytes(path.read_bytes() + b"\x00" * 16)
    assert load_image(path).shape == (H, W, 3)


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp"])
def test_load_truncated_image(tmp_path: Path, ext: str) -> None:
    path = truncate(write_image(tmp_path / f"cut{ext}", shape=(64, 64)))
    with pytest.raises(DataError, match="truncated") as err:
        load_image(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("content", "pattern"),
    [(None, "does not exist"), (b"", "empty"), (b"hello, not an image", "cannot decode")],
)
def test_load_unreadable_image(tmp_path: Path, content: bytes | None, pattern: str) -> None:
    path = tmp_path / "bad.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=pattern) as err:
        load_image(path)
    assert str(path) in str(err.value)


def test_load_directory_is_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a file"):
        load_image(tmp_path)


def test_load_mask_binary(tmp_path: Path) -> None:
    mask = load_mask(write_mask(tmp_path / "m.png"))
    assert mask.dtype == bool and mask.shape == (H, W)
    assert mask.sum() == 6 * 7 and mask[5, 6] and not mask[0, 0]


def test_load_mask_zero_one_and_color(tmp_path: Path) -> None:
    ones = np.zeros((4, 4), np.uint8)
    ones[1, 2] = 1
    cv2.imwrite(str(tmp_path / "01.png"), ones)
    assert load_mask(tmp_path / "01.png").sum() == 1
    color = np.zeros((4, 4, 3), np.uint8)
    color[3, 3, 2] = 255
    cv2.imwrite(str(tmp_path / "rgb.png"), color)
    assert load_mask(tmp_path / "rgb.png").tolist()[3][3] is True


def test_load_mask_resizes_nearest(tmp_path: Path) -> None:
    mask = load_mask(write_mask(tmp_path / "m.png"), shape=(H * 2, W * 2))
    assert mask.shape == (H * 2, W * 2) and mask.dtype == bool
    assert mask.sum() == 4 * 6 * 7
    assert load_mask(tmp_path / "m.png", shape=(H, W)).shape == (H, W)


def test_load_mask_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "m.png"
    path.write_text("nope")
    with pytest.raises(DataError, match=str(path)):
        load_mask(path)
    with pytest.raises(DataError, match="truncated"):
        load_mask(truncate(write_mask(tmp_path / "t.png", shape=(64, 64))))


def test_resize_image_shapes_and_modes() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    small = resize_image(img, (15, 20))
    assert small.shape == (15, 20, 3) and small.dtype == np.uint8
    assert np.array_equal(small, cv2.resize(img, (20, 15), interpolation=cv2.INTER_AREA))
    big = resize_image(img, (64, 80))
    assert big.shape == (64, 80, 3)
    assert np.array_equal(big, cv2.resize(img, (80, 64), interpolation=cv2.INTER_LINEAR))
    assert np.array_equal(resize_image(img, (15, 20)), small)  # deterministic
    same = resize_image(img, (30, 50))
    assert np.array_equal(same, img) and same is not img
    assert resize_image(img[..., 0].copy(), (10, 10)).shape == (10, 10, 3)
    with pytest.raises(ValueError):
        resize_image(img.astype(np.float32), (10, 10))


# ------------------------------------------------------------------------------------------
# readers


def test_mvtec_with_masks(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "mvtec")
    (root / "readme.txt").write_text("x")
    (root / "bottle" / "train" / "good" / "Thumbs.db").write_bytes(b"x")
    (root / "bottle" / "train" / "good" / ".hidden.png").write_bytes(b"x")
    (root / "bottle" / "test" / "crack" / "notes.txt").write_text("x")
    ds = open_dataset(root)
    assert isinstance(ds, MVTecAD) and ds.root == root
    assert ds.classes == ["bottle", "cable"]
    train, test = ds.samples("train"), ds.samples("test")
    assert len(train) == 6 and all(s.label == 0 and s.defect == "good" and s.mask_path is None for s in train)
    assert len(test) == 10
    assert [s.class_id for s in train] == [0, 0, 0, 1, 1, 1]
    bad = [s for s in test if s.label == 1]
    assert len(bad) == 6 and {s.defect for s in bad} == {"crack", "scratch"}
    for s in bad:
        assert s.mask_path == root / s.class_name / "ground_truth" / s.defect / f"{s.path.stem}_mask.png"
    assert all(s.mask_path is None for s in test if s.label == 0)
    assert test == sorted(test, key=lambda s: (s.class_id, s.path.parts))
    assert ds.has_masks("bottle") and ds.has_masks("cable")
    assert ds.samples("test") == test  # deterministic, and a copy
    ds.samples("test").clear()
    assert len(ds.samples("test")) == 10


def test_mvtec_image_level_only(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "m", classes=("cable",), masks=False)
    make_mvtec(root, classes=("bottle",), masks=True)
    ds = MVTecAD(root)
    assert ds.has_masks("bottle") and not ds.has_masks("cable")
    assert all(s.mask_path is None for s in ds.samples("test") if s.class_name == "cable")
    with pytest.raises(DataError, match="unknown class"):
        ds.has_masks("zipper")


def test_visa(tmp_path: Path) -> None:
    ds = open_dataset(make_visa(tmp_path / "visa"))
    assert isinstance(ds, VisA) and ds.classes == ["candle", "pcb1"]
    train, test = ds.samples("train"), ds.samples("test")
    assert len(train) == 4 and len(test) == 6
    anomalies = [s for s in test if s.label]
    assert len(anomalies) == 4 and all(s.mask_path is not None and s.mask_path.is_file() for s in anomalies)
    assert all(s.defect == "anomaly" for s in anomalies)
    assert {s.class_id for s in test if s.class_name == "pcb1"} == {1}
    assert ds.has_masks("candle")


def test_visa_bad_rows(tmp_path: Path) -> None:
    root = make_visa(tmp_path / "visa")
    csv_path = root / "split_csv" / "1cls.csv"
    text = csv_path.read_text()
    csv_path.write_text(text.replace("Anomaly/001.JPG", "Anomaly/999.JPG", 1))
    with pytest.raises(DataError, match="999.JPG"):
        VisA(root)
    csv_path.write_text(text.replace("pcb1/Data/Masks/Anomaly/000.png", ""))
    with pytest.raises(DataError, match="has no mask"):
        VisA(root)
    csv_path.write_text(text.replace("object,", "thing,"))
    with pytest.raises(DataError, match="lacks columns"):
        VisA(root)


def test_btad(tmp_path: Path) -> None:
    root = make_btad(tmp_path / "btad")
    (root / "01" / "test" / "ko" / "Thumbs.db").write_bytes(b"x")
    ds = open_dataset(root)
    assert isinstance(ds, BTAD) and ds.classes == ["01", "02"]
    assert len(ds.samples("train")) == 4
    test = ds.samples("test")
    assert len(test) == 8
    ko = [s for s in test if s.label]
    assert {s.defect for s in ko} == {"ko"} and {s.defect for s in test if not s.label} == {"good"}
    names = sorted(s.mask_path.name for s in ko if s.class_name == "01")  # type: ignore[union-attr]
    assert names == ["0000.png", "0001_mask.png"]
    assert ko[0].path.suffix == ".bmp"
    assert ds.has_masks("01")


def test_mvtec3d_rgb(tmp_path: Path) -> None:
    ds = open_dataset(make_mvtec3d(tmp_path / "m3d"))
    assert isinstance(ds, MVTec3DRGB) and ds.classes == ["bagel"]
    train = ds.samples("train")
    assert len(train) == 3 and all(s.path.parent.name == "rgb" for s in train)
    test = ds.samples("test")
    assert len(test) == 3
    assert [s.mask_path for s in test if not s.label] == [None]
    for s in (s for s in test if s.label):
        assert s.defect == "crack" and s.mask_path == s.path.parent.parent / "gt" / s.path.name
    assert ds.has_masks("bagel")


def test_mvtec3d_orphan_gt(tmp_path: Path) -> None:
    root = make_mvtec3d(tmp_path / "m3d")
    orphan = write_mask(root / "bagel" / "test" / "crack" / "gt" / "007.png")
    with pytest.raises(DataError, match=str(orphan)):
        MVTec3DRGB(root)


def test_union_global_class_ids(tmp_path: Path) -> None:
    a = make_mvtec(tmp_path / "a", classes=("zipper", "bottle"))
    b = make_btad(tmp_path / "b")
    ds = open_roots([a, str(b)])
    assert isinstance(ds, UnionDataset)
    assert ds.classes == ["01", "02", "bottle", "zipper"] and ds.roots == [a, b]
    for split in ("train", "test"):
        for s in ds.samples(split):
            assert ds.classes[s.class_id] == s.class_name
    assert {s.class_id for s in ds.samples("train")} == {0, 1, 2, 3}
    assert ds.has_masks("01") and ds.has_masks("zipper")


def test_union_duplicate_classes(tmp_path: Path) -> None:
    a = make_mvtec(tmp_path / "a", classes=("bottle",))
    b = make_mvtec(tmp_path / "b", classes=("bottle", "cable"))
    with pytest.raises(DataError, match="bottle") as err:
        open_roots([a, b])
    assert str(a) in str(err.value) and str(b) in str(err.value)
    with pytest.raises(DataError):
        UnionDataset([])


def test_class_filter_reindexes(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "m", classes=("bottle", "cable", "zipper"))
    ds = open_roots([root], classes=["zipper", "bottle"])
    assert isinstance(ds, MVTecAD) and ds.classes == ["bottle", "zipper"]
    assert {(s.class_name, s.class_id) for s in ds.samples("test")} == {("bottle", 0), ("zipper", 1)}
    assert len(ds.samples("train")) == 6
    single = open_roots(str(root), classes=["cable"])
    assert single.classes == ["cable"] and {s.class_id for s in single.samples("train")} == {0}
    full = open_roots(root)
    assert full.classes == ["bottle", "cable", "zipper"]  # filtering copies, never mutates
    with pytest.raises(DataError, match="bottle, cable, zipper") as err:
        open_roots([root], classes=["bottle", "carpet"])
    assert "carpet" in str(err.value)
    with pytest.raises(DataError, match="no classes selected"):
        open_roots([root], classes=[])


def test_bad_split(tmp_path: Path) -> None:
    ds = open_dataset(make_mvtec(tmp_path / "m", classes=("bottle",)))
    with pytest.raises(DataError, match="unknown split"):
        ds.samples("val")


# ------------------------------------------------------------------------------------------
# the layout registry

MAKERS = {"mvtec": make_mvtec, "visa": make_visa, "btad": make_btad, "mvtec3d": make_mvtec3d}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_layout_is_detected_and_opens_by_name(tmp_path: Path, name: str) -> None:
    assert set(MAKERS) == set(LAYOUTS), "give each registered layout a maker above"
    root = MAKERS[name](tmp_path / name)
    detected = [other for other, layout in LAYOUTS.items() if layout.detect(root)]
    assert detected[0] == name  # the first detector to match is its own
    ds = open_dataset(root)
    assert type(ds) is LAYOUTS[name].opener and ds.samples("train") and ds.samples("test")
    assert type(open_dataset(root, layout=name)) is LAYOUTS[name].opener


def test_unknown_layout_name(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown dataset layout 'coco'; choose one of visa, mvtec3d, btad, mvtec"):
        open_dataset(make_mvtec(tmp_path / "m"), layout="coco")


# --------------------------------------------------------------------------------------------
# layout errors


def test_missing_root(tmp_path: Path) -> None:
    root = tmp_path / "nope"
    for opener in (open_dataset, *(layout.opener for layout in LAYOUTS.values())):
        with pytest.raises(DataError, match="does not exist") as err:
            opener(root)
        assert str(root) in str(err.value)
    with pytest.raises(DataError, match="no dataset roots"):
        open_roots([])


def test_root_without_class_folders(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no class folders") as err:
        open_dataset(tmp_path)
    assert "MVTec AD" in str(err.value) and "VisA" in str(err.value) and "BTAD" in str(err.value)
    with pytest.raises(DataError, match="no class folders"):
        MVTecAD(tmp_path)


def test_root_matching_no_layout(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "m", classes=("bottle",))
    with pytest.raises(DataError, match="single class folder"):
        open_dataset(root / "bottle")
    (tmp_path / "other" / "stuff").mkdir(parents=True)
    with pytest.raises(DataError, match="matches no known dataset layout"):
        open_dataset(tmp_path / "other")


def test_class_without_train_good(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "m", classes=("bottle",))
    write_image(root / "cable" / "test" / "good" / "000.png")
    with pytest.raises(DataError, match="train/good") as err:
        open_dataset(root)
    assert str(root / "cable" / "train" / "good") in str(err.value)


def test_class_with_empty_train_good(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "m", classes=("bottle",))
    (root / "cable" / "train" / "good").mkdir(parents=True)
    (root / "cable" / "train" / "good" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="is empty") as err:
        open_dataset(root)
    assert str(root / "cable" / "train" / "good") in str(err.value)


def test_test_folder_missing_or_empty(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "m", classes=("bottle",), masks=False)
    write_image(root / "cable" / "train" / "good" / "000.png")
    with pytest.raises(DataError, match="missing") as err:
        open_dataset(root)
    assert str(root / "cable" / "test") in str(err.value)
    (root / "cable" / "test" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match="no test images") as err:
        open_dataset(root)
    assert str(root / "cable" / "test") in str(err.value)


def test_orphan_mask(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "m", classes=("bottle",))
    orphan = write_mask(root / "bottle" / "ground_truth" / "crack" / "042_mask.png")
    with pytest.raises(DataError, match="no matching test image") as err:
        open_dataset(root)
    assert str(orphan) in str(err.value)


def test_orphan_mask_type_folder(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "m", classes=("bottle",))
    orphan = write_mask(root / "bottle" / "ground_truth" / "hole" / "000_mask.png")
    with pytest.raises(DataError, match=str(orphan)):
        MVTecAD(root)


def test_missing_mask_in_masked_class(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path / "m", classes=("bottle",))
    (root / "bottle" / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(DataError, match="has no mask") as err:
        open_dataset(root)
    assert str(root / "bottle" / "test" / "crack" / "001.png") in str(err.value)
    assert str(root / "bottle" / "ground_truth" / "crack" / "001_mask.png") in str(err.value)


def test_btad_missing_mask(tmp_path: Path) -> None:
    root = make_btad(tmp_path / "b")
    (root / "02" / "ground_truth" / "ko" / "0000.png").unlink()
    with pytest.raises(DataError, match=r"0000\.png"):
        BTAD(root)


def test_public_constants() -> None:
    assert IMAGE_EXTENSIONS == (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
    assert issubclass(DataError, ValueError) and issubclass(MVTecAD, ADDataset)
    sample = Sample(Path("a.png"), "c", 0, 0, "good", None)
    with pytest.raises(AttributeError):
        sample.label = 1  # type: ignore[misc]


# ------------------------------------------------------------------------------------------
# real data


@pytest.mark.realdata
def test_realad_smoke(realad) -> None:
    ds = open_roots([realad])
    assert ds.classes == ["battery_weld", "elpv_mono", "elpv_poly", "magnetic_tile"]
    assert ds.has_masks("battery_weld") and ds.has_masks("magnetic_tile")
    assert not ds.has_masks("elpv_mono") and not ds.has_masks("elpv_poly")

    def counts(name: str) -> tuple[int, int, int]:
        test = [s for s in ds.samples("test") if s.class_name == name]
        train = [s for s in ds.samples("train") if s.class_name == name]
        return len(train), sum(s.label == 0 for s in test), sum(s.label == 1 for s in test)

    assert counts("battery_weld") == (37, 35, 93)  # /work/shared/data/README.md
    assert counts("magnetic_tile") == (714, 238, 388)
    assert counts("elpv_mono") == (400, 100, 150)
    tile = {s.defect for s in ds.samples("test") if s.class_name == "magnetic_tile"}
    assert tile == {"good", "blowhole", "break", "crack", "fray", "uneven"}
    for name in ds.classes:
        sample = next(s for s in ds.samples("test") if s.class_name == name and s.label == 1)
        img = load_image(sample.path)
        assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8
        if sample.mask_path is not None:
            mask = load_mask(sample.mask_path)
            assert mask.shape == img.shape[:2] and mask.any()
