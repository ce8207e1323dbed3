"""Reading images and label maps from disk, with one clear error per problem.

Every failure a user can cause (missing file, truncated or non-image file, label of the wrong size,
label values that are not class ids) becomes a ``DataError`` (an ``SkdError``) whose message names the file.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.errors import SkdError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# Marks a raw label value that has no meaning in a dataset's lookup table.
INVALID = -1

# Errors Pillow raises for broken files: OSError covers "image file is truncated" and
# UnidentifiedImageError; SyntaxError and ValueError come from corrupt PNG/JPEG chunks.
_PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class DataError(SkdError):
    """A problem with a dataset file, raised where the file is read (often in a DataLoader worker:
    SkdError keeps such an error to its one line)."""


def _open_decoded(path: Path, what: str) -> Image.Image:
    """Open and fully decode ``path`` (Pillow decodes lazily, so truncation only shows on load)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} file not found: {path}")
    try:
        img = Image.open(path)
        img.load()
    except _PIL_ERRORS as e:
        raise DataError(f"cannot read {what} file {path}: {e}") from None
    return img


class _TrickleReader(io.BytesIO):
    """A file that hands out one byte per read from offset ``slow_from`` on, so that once Pillow has
    decoded an image from it, ``tell()`` is exactly where the decoder stopped reading."""

    def __init__(self, data: bytes, slow_from: int) -> None:
        super().__init__(data)
        self.slow_from = slow_from

    def read(self, size: int | None = -1) -> bytes:
        here = self.tell()
        if here >= self.slow_from:
            size = 1
        elif size is None or size < 0 or here + size > self.slow_from:
            size = self.slow_from - here
        return super().read(size)


def _jpeg_scan_extent(data: bytes) -> tuple[int, int] | None:
    """Offsets of the first scan's data and of the end-of-image marker of the first image in
    ``data`` (a JPEG), found by walking its segments and scans; None when the structure does not
    lead to an end-of-image marker (a damaged file)."""
    pos = 2  # after the start-of-image marker
    first_scan = None
    while pos + 1 < len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == 0xD9:
            return (first_scan, pos) if first_scan is not None else None
        elif 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            pos += 2
        else:
            pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
            if marker == 0xDA:  # a scan: its data runs to the next marker (0xFF00 is a data byte, RSTn a restart)
                first_scan = pos if first_scan is None else first_scan
                while True:
                    pos = data.find(b"\xff", pos)
                    if pos < 0 or pos + 1 >= len(data):
                        return None
                    if data[pos + 1] != 0x00 and not 0xD0 <= data[pos + 1] <= 0xD7:
                        break
                    pos += 2
    return None


def check_jpeg_data(path: str | Path) -> None:
    """Raise DataError if the compressed data of the JPEG file ``path`` is damaged where decoding
    alone does not show it.

    libjpeg (in Pillow) conceals damage inside a JPEG's compressed data: bytes that lose the decoder
    its place give a wrong image, and no error. Once lost, the decoder finishes the image before
    the data ends (bytes left over), or runs out of data before the image ends (it fills the rest
    in). Both are checked: where the decoder stopped reading against the end-of-image marker, and
    whether the pixels change when ones are appended to the data (only a decoder that ran out reads
    them). For the usual baseline JPEGs this finds nearly every run of random bytes; in progressive
    JPEGs and ones with restart markers, only damage that reaches the last scan or interval.
    Files that are not JPEGs are left alone; ``read_image`` reports what Pillow itself finds.
    """
    path = Path(path)
    data = path.read_bytes()
    if not data.startswith(b"\xff\xd8"):
        return
    extent = _jpeg_scan_extent(data)
    if extent is None:
        raise DataError(f"cannot read image file {path}: corrupt JPEG data (its segments do not lead to an "
                        "end-of-image marker)")
    first_scan, end = extent
    try:
        # Read in blocks up to just before the end marker (Pillow reads the header whole), then byte by
        # byte: a decoder that finished early has read no further than where the bytes start.
        reader = _TrickleReader(data, slow_from=max(first_scan, end - 16))
        with Image.open(reader) as img:
            img.load()
            pixels = np.asarray(img)
        stopped = reader.tell()
        padded = data[:end] + b"\xff\x00" * 64 + data[end:]  # 512 one-bits before the end marker
        with Image.open(io.BytesIO(padded)) as img:
            img.load()
            pixels_padded = np.asarray(img)
    except _PIL_ERRORS as e:
        raise DataError(f"cannot read image file {path}: {e}") from None
    if stopped < end:
        raise DataError(f"cannot read image file {path}: corrupt JPEG data (the image was complete {end - stopped} "
                        "bytes before the end of its compressed data)")
    if not np.array_equal(pixels, pixels_padded):
        raise DataError(f"cannot read image file {path}: corrupt JPEG data (its compressed data ends before the "
                        "image does)")


def read_image(path: str | Path) -> torch.Tensor:
    """Read an image as a uint8 tensor 3×H×W in RGB order.

    Other modes are converted as Pillow converts them to RGB: greyscale gives R = G = B, an alpha
    channel is dropped (the colour values are kept, not blended onto a background), palette images
    give their colours. 16-bit greyscale keeps its high byte, as Pillow reads 16-bit colour PNGs.
    32-bit integer and floating-point images have no fixed range and are refused.
    """
    img = _open_decoded(Path(path), "image")
    if img.mode.startswith("I;16"):
        # Pillow's own convert() clips 16-bit values at 255 (a white image); keep the high byte.
        high = (np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8)
        img = Image.fromarray(high)  # mode L
    elif img.mode in ("I", "F"):
        kind = "32-bit integer" if img.mode == "I" else "floating-point"
        raise DataError(f"image file {path} is a {kind} image (mode {img.mode}) with no fixed value range: "
                        "save it as 8-bit RGB or greyscale")
    if img.mode != "RGB":
        try:
            img = img.convert("RGB")
        except _PIL_ERRORS as e:
            raise DataError(f"cannot convert image file {path} (mode {img.mode}) to RGB: {e}") from None
    array = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def read_label(path: str | Path) -> np.ndarray:
    """Read a single-channel label map as int64 H×W with the raw values stored in the file.

    Palette PNGs give their palette indices (the class ids), not their colours.
    """
    img = _open_decoded(Path(path), "label")
    if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
        raise DataError(
            f"label file {path} has mode {img.mode}; expected a single-channel image of class ids "
            "(8/16-bit grayscale or palette PNG), not a colour image"
        )
    return np.asarray(img).astype(np.int64)


def image_size(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image from its header only (no pixel decoding)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            width, height = img.size
    except _PIL_ERRORS as e:
        raise DataError(f"cannot read image file {path}: {e}") from None
    return height, width


def check_same_size(image_path: Path, image_hw: tuple[int, int], label_path: Path, label_hw: tuple[int, int]) -> None:
    """Raise if a label map does not cover its image pixel for pixel."""
    if tuple(image_hw) != tuple(label_hw):
        raise DataError(
            f"label file {label_path} is {label_hw[0]}x{label_hw[1]} (HxW) but its image {image_path} "
            f"is {image_hw[0]}x{image_hw[1]}"
        )


def map_label(raw: np.ndarray, lut: np.ndarray, path: str | Path, allowed: str) -> np.ndarray:
    """Map raw label values through ``lut`` (raw value -> train id, 255 or INVALID).

    Raises SkdError naming ``path`` and the offending raw values when any pixel is not allowed;
    ``allowed`` describes the accepted values for the message.
    """
    if raw.size == 0:
        return raw.astype(np.int64)
    outside = (raw < 0) | (raw >= len(lut))
    if outside.any():
        bad = np.unique(raw[outside])
        raise DataError(f"label file {path} has values {_list_values(bad)} that are not allowed ({allowed})")
    mapped = lut[raw]
    invalid = mapped == INVALID
    if invalid.any():
        bad = np.unique(raw[invalid])
        raise DataError(f"label file {path} has values {_list_values(bad)} that are not allowed ({allowed})")
    return mapped


def _list_values(values: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(int(v)) for v in values[:limit])
    more = f", ... ({len(values)} distinct)" if len(values) > limit else ""
    return f"[{shown}{more}]"


def make_lut(mapping: dict[int, int], size: int = 256, default: int = INVALID) -> np.ndarray:
    """A lookup table of ``size`` entries: ``lut[raw] = mapping.get(raw, default)``."""
    lut = np.full(size, default, dtype=np.int64)
    for raw, target in mapping.items():
        lut[raw] = target
    return lut


def require_dir(path: Path, what: str) -> Path:
    """Return ``path`` if it is a directory, else raise SkdError naming it."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{what} directory not found: {path}")
    return path


def list_images(folder: Path, extensions: tuple[str, ...] = IMAGE_EXTENSIONS, recursive: bool = False) -> list[Path]:
    """Image files directly in ``folder`` (or below it, when recursive), sorted by path."""
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in extensions)


def pair_by_stem(images: list[Path], labels: list[Path], image_dir: Path, label_dir: Path, image_suffix: str = "",
                 label_suffix: str = "") -> list[tuple[str, Path, Path]]:
    """Pair image and label files by their path (relative to their folders) without extension, and
    without ``image_suffix``/``label_suffix`` at the end of the name (``seq1/0001_image.jpg`` pairs
    with ``seq1/0001_label.png`` under suffixes ``_image`` and ``_label``; the id is ``seq1/0001``).

    Returns ``(key, image, label)`` sorted by key. Raises SkdError naming the first unpaired or
    ambiguous file, the file it looked for, and how many others there are, so a half-copied dataset
    is caught at once.
    """
    def keyed(files: list[Path], root: Path, what: str, suffix: str) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for f in files:
            key = f.relative_to(root).with_suffix("").as_posix()
            if suffix and key.endswith(suffix):
                key = key[: -len(suffix)]
            if key in out:
                raise DataError(f"two {what} files share the name {key!r}: {out[key]} and {f}")
            out[key] = f
        return out

    image_by_key = keyed(images, image_dir, "image", image_suffix)
    label_by_key = keyed(labels, label_dir, "label", label_suffix)
    no_label = sorted(set(image_by_key) - set(label_by_key))
    if no_label:
        others = f" (and {len(no_label) - 1} more)" if len(no_label) > 1 else ""
        wanted = label_dir / f"{no_label[0]}{label_suffix}.png"
        raise DataError(f"image file {image_by_key[no_label[0]]} has no label file: looked for {wanted}{others}")
    no_image = sorted(set(label_by_key) - set(image_by_key))
    if no_image:
        others = f" (and {len(no_image) - 1} more)" if len(no_image) > 1 else ""
        wanted = image_dir / f"{no_image[0]}{image_suffix}.*"
        raise DataError(f"label file {label_by_key[no_image[0]]} has no image file: looked for {wanted}{others}")
    return [(key, image_by_key[key], label_by_key[key]) for key in sorted(image_by_key)]


def files_fingerprint(root: Path, files: list[Path]) -> str:
    """sha256 over the sorted paths (relative to ``root``) and byte sizes of ``files``.

    Cheap (one stat per file) and independent of where the dataset lives, so a copy of the same
    files elsewhere has the same fingerprint, while an added, removed or re-encoded file changes it.
    """
    entries = sorted((f.relative_to(root).as_posix(), f.stat().st_size) for f in files)
    digest = hashlib.sha256()
    for rel, size in entries:
        digest.update(f"{rel}\t{size}\n".encode())
    return digest.hexdigest()


def voc_colormap(n: int) -> list[tuple[int, int, int]]:
    """The PASCAL VOC bit-interleaved colour map for ids 1..n (id 0, black, is skipped)."""
    colours = []
    for i in range(1, n + 1):
        r = g = b = 0
        c = i
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
            if c == 0:
                break
        colours.append((r, g, b))
    return colours
