"""Anomaly-detection dataset readers (torch-free; pixels come from `imaging`).

Torch-free, like `imaging`. Readers only *list* files at construction (fast, and every layout
problem surfaces before a long training run starts); pixels are decoded later by
`imaging.load_image` / `load_mask` (re-exported here with `resize_image`, `DataError`).
"""

from __future__ import annotations

import copy
import csv
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from hgad_edge.core.imaging import IMAGE_EXTENSIONS, DataError, image_size, load_image, load_mask, resize_image

__all__ = [
    "IMAGE_EXTENSIONS",
    "LAYOUTS",
    "ADDataset",
    "BTAD",
    "DataError",
    "Layout",
    "MVTec3DRGB",
    "MVTecAD",
    "Sample",
    "UnionDataset",
    "VisA",
    "image_shape",
    "load_image",
    "load_mask",
    "open_dataset",
    "open_roots",
    "resize_image",
]

SPLITS = ("train", "test")
HEADER_BYTES = 1 << 16  # where an image file's size is read from (`image_shape`)


@dataclass(frozen=True)
class Sample:
    """One image of a dataset split, with everything needed to score it."""

    path: Path
    class_name: str
    class_id: int
    label: int
    defect: str
    mask_path: Path | None


def image_shape(path: Path | str) -> tuple[int, int]:
    """(H, W) of an image file, as `load_image` will decode it, from its header: the first
    HEADER_BYTES, else the whole file (a JPEG whose EXIF block comes before its frame header), else
    decoded (a format whose header `imaging.image_size` cannot read)."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            size = image_size(handle.read(HEADER_BYTES))
        if size is None:
            size = image_size(path.read_bytes())
    except OSError as err:
        msg = f"cannot read image file {path}: {err.strerror or err}; check that it exists and is readable"
        raise DataError(msg) from err
    if size is None:
        size = load_image(path).shape[:2]
    return int(size[0]), int(size[1])


# --------------------------------------------------------------------------------------------
# folder helpers


def _visible(path: Path) -> bool:
    """Hidden files (.DS_Store, ._x AppleDouble) and __MACOSX are archive debris, not data."""
    return not path.name.startswith((".", "__"))


def _entries(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if _visible(p))
    except OSError as err:
        msg = f"cannot list folder {folder}: {err.strerror or err}; check that it exists and is readable"
        raise DataError(msg) from err


def _subdirs(folder: Path) -> list[Path]:
    return [p for p in _entries(folder) if p.is_dir()]


def _images(folder: Path) -> list[Path]:
    """Image files of a folder, sorted; other files (Thumbs.db, .txt, ...) are ignored."""
    if not folder.is_dir():
        return []
    return [p for p in _entries(folder) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]


def _require_root(root: Path | str) -> Path:
    root = Path(root)
    if not root.exists():
        msg = f"dataset root {root} does not exist; pass the folder that holds one subfolder per class"
        raise DataError(msg)
    if not root.is_dir():
        msg = f"dataset root {root} is not a folder; pass the folder that holds one subfolder per class"
        raise DataError(msg)
    return root


def _class_dirs(root: Path, expected: str) -> list[Path]:
    dirs = _subdirs(root)
    if not dirs:
        msg = f"dataset root {root} has no class folders; expected {expected}"
        raise DataError(msg)
    return dirs


def _mask_stem(mask: Path) -> str:
    """Image stem a mask belongs to: '<stem>_mask.png' and '<stem>.png' are both accepted."""
    return mask.stem[: -len("_mask")] if mask.stem.endswith("_mask") else mask.stem


def _mask_index(folder: Path | None) -> dict[str, Path]:
    """Image stem -> mask file; '_mask' names win over plain ones, then .png over other types."""
    index: dict[str, Path] = {}
    if folder is None:
        return index
    ranked = sorted(_images(folder), key=lambda p: (not p.stem.endswith("_mask"), p.suffix.lower() != ".png", p.name))
    for mask in ranked:
        index.setdefault(_mask_stem(mask), mask)
    return index


def _check_orphan_masks(mask_dir: Path, image_dir: Path) -> None:
    """A mask without its image means a broken copy: fail now rather than silently drop data."""
    stems = {p.stem for p in _images(image_dir)}
    for mask in _images(mask_dir):
        stem = _mask_stem(mask)
        if stem not in stems:
            msg = (
                f"mask {mask} has no matching test image {image_dir / stem}.<ext>; restore the image or delete the mask"
            )
            raise DataError(msg)


@dataclass(frozen=True)
class _TestGroup:
    """One folder of test images of one class, with where its masks live."""

    defect: str
    label: int
    image_dir: Path
    mask_dir: Path | None


def _require_images(folder: Path, expected: str) -> list[Path]:
    images = _images(folder)
    if not images:
        state = "is empty" if folder.is_dir() else "is missing"
        msg = f"{folder} {state}; expected {expected} with images ({', '.join(IMAGE_EXTENSIONS)})"
        raise DataError(msg)
    return images


def _folder_class(
    class_name: str,
    train_images: list[Path],
    groups: list[_TestGroup],
    masked: bool,
    mask_name: str,
    test_dir: Path,
) -> tuple[list[Sample], list[Sample]]:
    """Build one class's samples from listed folders; `mask_name` formats the expected mask."""
    train = [Sample(p, class_name, -1, 0, "good", None) for p in train_images]
    test: list[Sample] = []
    for group in groups:
        masks = _mask_index(group.mask_dir) if masked and group.label else {}
        for image in _images(group.image_dir):
            mask = masks.get(image.stem) if group.label else None
            if masked and group.label and mask is None:
                expected = (group.mask_dir or test_dir) / mask_name.format(stem=image.stem)
                msg = (
                    f"anomalous image {image} has no mask; expected {expected} "
                    "(this class has masks for other images: add the missing mask, "
                    "or remove the class's mask folder to use image-level labels only)"
                )
                raise DataError(msg)
            test.append(Sample(image, class_name, -1, group.label, group.defect, mask))
    if not test:
        msg = f"{test_dir} has no test images; expected {test_dir}/<type>/ with images (a class must have test images)"
        raise DataError(msg)
    return train, test


# --------------------------------------------------------------------------------------------
# datasets


class ADDataset:
    """Listed samples of one or more classes; subclasses only differ in how they find files."""

    root: Path
    roots: list[Path]
    classes: list[str]

    def __init__(self, root: Path | str, train: Iterable[Sample], test: Iterable[Sample]) -> None:
        self.root = Path(root)
        self.roots = [self.root]
        self._assign(list(train), list(test))

    def _assign(self, train: list[Sample], test: list[Sample]) -> None:
        """Give samples the global class index of the sorted class list, and sort them."""
        self.classes = sorted({s.class_name for s in train} | {s.class_name for s in test})
        index = {name: i for i, name in enumerate(self.classes)}

        def finish(samples: list[Sample]) -> list[Sample]:
            ided = [replace(s, class_id=index[s.class_name]) for s in samples]
            return sorted(ided, key=lambda s: (s.class_id, s.path.parts))

        self._splits = {"train": finish(train), "test": finish(test)}
        self._masked = {name: False for name in self.classes}
        for s in self._splits["test"]:
            if s.mask_path is not None:
                self._masked[s.class_name] = True

    def samples(self, split: str) -> list[Sample]:
        """Samples of "train" (normal only) or "test", sorted by class then path."""
        if split not in self._splits:
            msg = f"unknown split {split!r} for dataset {self.root}; use one of {list(SPLITS)}"
            raise DataError(msg)
        return list(self._splits[split])

    def has_masks(self, class_name: str) -> bool:
        """Whether pixel metrics are possible: the class has masks for its anomalous test images."""
        self._require_class(class_name)
        return self._masked[class_name]

    def select(self, classes: Sequence[str]) -> ADDataset:
        """Copy keeping only `classes`, with class ids re-indexed 0..n-1 in sorted order."""
        wanted = set(classes)
        if not wanted:
            msg = f"no classes selected from {self.root}; available classes: {', '.join(self.classes)}"
            raise DataError(msg)
        for name in sorted(wanted):
            self._require_class(name)
        subset = copy.copy(self)
        train, test = ([s for s in self._splits[split] if s.class_name in wanted] for split in SPLITS)
        subset._assign(train, test)
        return subset

    def _require_class(self, class_name: str) -> None:
        if class_name not in self.classes:
            where = ", ".join(str(r) for r in self.roots)
            msg = f"unknown class {class_name!r} in {where}; available classes: {', '.join(self.classes)}"
            raise DataError(msg)

    def __repr__(self) -> str:
        sizes = {split: len(samples) for split, samples in self._splits.items()}
        return f"{type(self).__name__}(root={str(self.root)!r}, classes={self.classes}, sizes={sizes})"


class _FolderDataset(ADDataset):
    """Datasets with one folder per class; subclasses say how one class folder is laid out."""

    EXPECTED = "<root>/<class>/..."

    def __init__(self, root: Path | str) -> None:
        root = _require_root(root)
        train: list[Sample] = []
        test: list[Sample] = []
        for class_dir in _class_dirs(root, self.EXPECTED):
            class_train, class_test = self._scan_class(class_dir)
            train += class_train
            test += class_test
        super().__init__(root, train, test)

    @staticmethod
    def _scan_class(class_dir: Path) -> tuple[list[Sample], list[Sample]]:
        raise NotImplementedError


def _scan_flat_class(class_dir: Path, normal: str, mask_name: str) -> tuple[list[Sample], list[Sample]]:
    """MVTec-style class: train/<normal>, test/<type>/, optional ground_truth/<type>/ masks."""
    train_images = _require_images(class_dir / "train" / normal, f"{class_dir}/train/{normal}")
    test_dir = class_dir / "test"
    if not test_dir.is_dir():
        msg = f"{test_dir} is missing; expected {test_dir}/<type>/ with images (a class must have test images)"
        raise DataError(msg)
    gt_dir = class_dir / "ground_truth"
    masked = gt_dir.is_dir()
    if masked:
        for mask_dir in _subdirs(gt_dir):
            _check_orphan_masks(mask_dir, test_dir / mask_dir.name)
    groups = [
        _TestGroup("good" if d.name == normal else d.name, int(d.name != normal), d, gt_dir / d.name)
        for d in _subdirs(test_dir)
    ]
    return _folder_class(class_dir.name, train_images, groups, masked, mask_name, test_dir)


class MVTecAD(_FolderDataset):
    """MVTec AD layout; a class without ground_truth/ is image-level only."""

    EXPECTED = "<root>/<class>/train/good with images"

    @staticmethod
    def _scan_class(class_dir: Path) -> tuple[list[Sample], list[Sample]]:
        return _scan_flat_class(class_dir, "good", "{stem}_mask.png")


class BTAD(_FolderDataset):
    """BTAD layout (train/ok, test/ok, test/ko, ground_truth/ko); masks '<stem>.png' or '_mask.png'."""

    EXPECTED = "<root>/<class>/train/ok with images"

    @staticmethod
    def _scan_class(class_dir: Path) -> tuple[list[Sample], list[Sample]]:
        return _scan_flat_class(class_dir, "ok", "{stem}.png")


class MVTec3DRGB(_FolderDataset):
    """MVTec 3D-AD, RGB only; train/good and validation/good both count as normal training data."""

    EXPECTED = "<root>/<class>/train/good/rgb with images"

    @staticmethod
    def _scan_class(class_dir: Path) -> tuple[list[Sample], list[Sample]]:
        train_images = _require_images(class_dir / "train" / "good" / "rgb", f"{class_dir}/train/good/rgb")
        train_images += _images(class_dir / "validation" / "good" / "rgb")
        test_dir = class_dir / "test"
        if not test_dir.is_dir():
            msg = f"{test_dir} is missing; expected {test_dir}/<type>/rgb/ with images (a class must have test images)"
            raise DataError(msg)
        groups = [
            _TestGroup("good" if d.name == "good" else d.name, int(d.name != "good"), d / "rgb", d / "gt")
            for d in _subdirs(test_dir)
        ]
        anomalous = [g for g in groups if g.label]
        masked = any(g.mask_dir is not None and g.mask_dir.is_dir() for g in anomalous)
        if masked:
            for group in anomalous:
                if group.mask_dir is not None and group.mask_dir.is_dir():
                    _check_orphan_masks(group.mask_dir, group.image_dir)
        return _folder_class(class_dir.name, train_images, groups, masked, "{stem}.png", test_dir)


class VisA(ADDataset):
    """Official VisA layout driven by split_csv/1cls.csv (object,split,label,image,mask)."""

    COLUMNS = ("object", "split", "label", "image", "mask")

    def __init__(self, root: Path | str) -> None:
        root = _require_root(root)
        csv_path = root / "split_csv" / "1cls.csv"
        if not csv_path.is_file():
            msg = f"{csv_path} is missing; expected the official VisA split file <root>/split_csv/1cls.csv"
            raise DataError(msg)
        train: list[Sample] = []
        test: list[Sample] = []
        for line, row in self._rows(csv_path):
            sample = self._sample(root, csv_path, line, row)
            (train if row["split"].strip().lower() == "train" else test).append(sample)
        self._check_classes(csv_path, train, test)
        super().__init__(root, train, test)

    @classmethod
    def _rows(cls, csv_path: Path) -> Iterable[tuple[int, dict[str, str]]]:
        try:
            with csv_path.open(newline="", encoding="utf-8-sig") as handle:
                reader = csv.DictReader(handle)
                missing = [c for c in cls.COLUMNS if c not in (reader.fieldnames or [])]
                if missing:
                    msg = f"{csv_path} lacks columns {missing}; expected header {','.join(cls.COLUMNS)}"
                    raise DataError(msg)
                rows = [(i + 2, row) for i, row in enumerate(reader) if any((v or "").strip() for v in row.values())]
        except (OSError, UnicodeDecodeError) as err:
            msg = f"cannot read {csv_path}: {err}; restore the VisA split file"
            raise DataError(msg) from err
        return rows

    @staticmethod
    def _sample(root: Path, csv_path: Path, line: int, row: dict[str, str]) -> Sample:
        where = f"{csv_path} line {line}"
        name = (row["object"] or "").strip()
        split = (row["split"] or "").strip().lower()
        label_text = (row["label"] or "").strip().lower()
        if not name:
            msg = f"{where}: empty object name; every row needs its class in the 'object' column"
            raise DataError(msg)
        if split not in SPLITS:
            msg = f"{where}: split {row['split']!r} is not 'train' or 'test'; fix the row"
            raise DataError(msg)
        if label_text not in ("normal", "anomaly"):
            msg = f"{where}: label {row['label']!r} is not 'normal' or 'anomaly'; fix the row"
            raise DataError(msg)
        label = int(label_text == "anomaly")
        if split == "train" and label:
            msg = f"{where}: anomalous image in the train split; training data must be normal only (use 1cls.csv)"
            raise DataError(msg)
        image = root / (row["image"] or "").strip()
        if not (row["image"] or "").strip() or not image.is_file():
            msg = f"{where}: image {image} does not exist; restore it or fix the 'image' column"
            raise DataError(msg)
        mask_text = (row["mask"] or "").strip()
        mask = root / mask_text if mask_text and label else None
        if mask is not None and not mask.is_file():
            msg = f"{where}: mask {mask} of image {image} does not exist; restore it or clear the 'mask' column"
            raise DataError(msg)
        return Sample(image, name, -1, label, "anomaly" if label else "good", mask)

    @staticmethod
    def _check_classes(csv_path: Path, train: list[Sample], test: list[Sample]) -> None:
        """Every class needs train and test images, and masks for all or none of its anomalies."""
        names = sorted({s.class_name for s in train + test})
        if not names:
            msg = f"{csv_path} lists no images; expected rows object,split,label,image,mask"
            raise DataError(msg)
        for name in names:
            for split, samples in (("train", train), ("test", test)):
                if not any(s.class_name == name for s in samples):
                    msg = f"{csv_path}: class {name!r} has no {split} rows; a class needs train and test images"
                    raise DataError(msg)
            anomalies = [s for s in test if s.class_name == name and s.label]
            unmasked = [s for s in anomalies if s.mask_path is None]
            if unmasked and len(unmasked) < len(anomalies):
                msg = (
                    f"{csv_path}: anomalous image {unmasked[0].path} of class {name!r} has no mask while "
                    "others do; fill its 'mask' column"
                )
                raise DataError(msg)


class UnionDataset(ADDataset):
    """Several datasets trained as one model: a single global class index over all members."""

    def __init__(self, datasets: Sequence[ADDataset]) -> None:
        if not datasets:
            msg = "UnionDataset needs at least one dataset; pass one or more dataset roots"
            raise DataError(msg)
        owner: dict[str, Path] = {}
        for dataset in datasets:
            for name in dataset.classes:
                if name in owner:
                    msg = (
                        f"class {name!r} exists in both {owner[name]} and {dataset.root}; class names must be "
                        "unique across roots: rename one class folder or drop one root"
                    )
                    raise DataError(msg)
                owner[name] = dataset.root
        train = [s for d in datasets for s in d.samples("train")]
        test = [s for d in datasets for s in d.samples("test")]
        super().__init__(datasets[0].root, train, test)
        self.roots = [r for d in datasets for r in d.roots]


# --------------------------------------------------------------------------------------------
# entry points


@dataclass(frozen=True)
class Layout:
    """A dataset layout: how to recognise a root of it, how to open one, and what it looks like."""

    label: str
    opener: Callable[[Path], ADDataset]
    detect: Callable[[Path], bool]
    expected: str


def _class_has(sub: str) -> Callable[[Path], bool]:
    return lambda root: any((d / sub).is_dir() for d in _subdirs(root))


# The layout registry, in detection order (the most specific first: an MVTec 3D-AD class also has
# train/good). A new layout is one entry here (and one maker in tests/test_data.py).
LAYOUTS: dict[str, Layout] = {
    "visa": Layout("VisA", VisA, lambda root: (root / "split_csv" / "1cls.csv").is_file(), "<root>/split_csv/1cls.csv"),
    "mvtec3d": Layout(
        "MVTec 3D-AD",
        MVTec3DRGB,
        _class_has("train/good/rgb"),
        "<root>/<class>/train/good/rgb/*.png, test/<type>/rgb/*.png",
    ),
    "btad": Layout("BTAD", BTAD, _class_has("train/ok"), "<root>/<class>/train/ok/*, test/ok/*, test/ko/*"),
    "mvtec": Layout(
        "MVTec AD",
        MVTecAD,
        _class_has("train/good"),
        "<root>/<class>/train/good/*, <class>/test/<type>/*, optional <class>/ground_truth/<type>/<stem>_mask.png",
    ),
}


def open_dataset(root: Path | str, layout: str | None = None) -> ADDataset:
    """Open `root` as `layout` (a LAYOUTS name), or as the first layout whose detector matches."""
    root = _require_root(root)
    if layout is not None:
        if layout not in LAYOUTS:
            raise DataError(f"unknown dataset layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
        return LAYOUTS[layout].opener(root)
    for entry in LAYOUTS.values():
        if entry.detect(root):
            return entry.opener(root)
    what = "has no class folders" if not _subdirs(root) else "matches no known dataset layout"
    hint = ""
    if (root / "train").is_dir():
        hint = f" ({root} looks like a single class folder: pass {root.parent} and classes=['{root.name}'])"
    expected = "; ".join(f"{entry.label}: {entry.expected}" for entry in LAYOUTS.values())
    msg = f"dataset root {root} {what}{hint}; expected one of: {expected}"
    raise DataError(msg)


def open_roots(roots: Sequence[Path | str] | Path | str, classes: Sequence[str] | None = None) -> ADDataset:
    """Open one root, or several as a UnionDataset, optionally keeping only `classes`."""
    if isinstance(roots, (str, Path)):
        roots = [roots]
    if not roots:
        msg = "no dataset roots given; pass at least one dataset folder"
        raise DataError(msg)
    datasets = [open_dataset(r) for r in roots]
    dataset = datasets[0] if len(datasets) == 1 else UnionDataset(datasets)
    if classes is None:
        return dataset
    if isinstance(classes, str):
        classes = [classes]
    return dataset.select(classes)
