"""Image/label loading and the train/test pipelines with mmseg 0.16 / mmcv 1.4 numerics (spec 2.4).

Train pipeline: keep-ratio resize -> random crop (cat_max_ratio) -> horizontal flip -> normalise
(BGR->RGB, ImageNet mean/std) -> pad to the crop size. Test pipeline: keep-ratio resize -> normalise.
Images are resized as uint8 with OpenCV INTER_LINEAR *before* normalising, labels with INTER_NEAREST,
which is what mmcv did (torch's bilinear differs by a grey level on ~13% of pixels).

All randomness comes from the ``np.random.Generator`` passed to the call; nothing touches global RNGs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import cv2
import numpy as np
import torch
from PIL import Image

from dida.constants import IGNORE_INDEX, IMG_MEAN, IMG_STD, NUM_CLASSES
from dida.errors import DataError


def data_error(path: str | os.PathLike[str], message: str) -> DataError:
    """A ``DataError`` whose message starts with ``path``; the path is also kept as ``.path``."""
    err = DataError(f"{path}: {message}")
    err.path = os.fspath(path)  # type: ignore[attr-defined]
    return err


# ------------------------------------------------------------------------------------------ loading

# The largest image (width x height) that is decoded: larger files are refused from their header, before
# decoding, like PIL's decompression-bomb check (a 30 kB PNG can declare 24000x24000 pixels = 1.7 GB of BGR).
# 2**28 pixels is 16384 x 16384, far above any dataset's images.
MAX_IMAGE_PIXELS = 2**28


def check_image_size(source: str | os.PathLike[str] | bytes | np.ndarray, path: str | os.PathLike[str]) -> None:
    """Read the width and height from the header of an image file (``source``: its path or its bytes) and raise
    a ``DataError`` naming ``path`` when it has more than ``MAX_IMAGE_PIXELS`` pixels. Formats PIL cannot
    identify are left to the decoder."""
    import io
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # the header is at the start (PNG, JPEG after its EXIF, BMP, WebP): the first MiB is enough
            fp = io.BytesIO(bytes(source[: 1 << 20])) if isinstance(source, (bytes, np.ndarray)) else source
            with Image.open(fp) as img:
                width, height = img.size
                shown, pixels = f"{width}x{height} pixels", width * height
    except Image.DecompressionBombError as e:  # PIL refused it from the header: far too large
        import re

        found = re.search(r"\((\d+) pixels\)", str(e))
        pixels = int(found.group(1)) if found else MAX_IMAGE_PIXELS + 1
        shown = f"{pixels} pixels"
    except Exception:
        return
    if pixels > MAX_IMAGE_PIXELS:
        raise data_error(path, f"the image declares {shown}, more than dida decodes ({MAX_IMAGE_PIXELS} pixels, "
                               "e.g. 16384x16384): a decompression bomb or a damaged file. Resize or remove it.")



def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode an image file as BGR uint8 [H, W, 3] (OpenCV, colour mode, like mmcv).

    Raises:
        DataError: the file is missing, unreadable or truncated.
    """
    if not os.path.isfile(path):
        raise data_error(path, "image file not found. Check the dataset root and split.")
    buf = np.fromfile(path, dtype=np.uint8)
    if buf.size:
        check_image_size(buf, path)
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    if img is None:
        raise data_error(path, "OpenCV cannot decode this image (truncated or not an image). "
                               "Re-extract the file or remove it from the dataset.")
    return img


def load_label(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a train-id label PNG as uint8 [H, W] (PIL, unchanged mode, like mmseg's LoadAnnotations).

    Raises:
        DataError: missing, unreadable/truncated, or not single-channel.
    """
    if not os.path.isfile(path):
        raise data_error(path, "label file not found. Run `dida convert` on the dataset root first.")
    check_image_size(path, path)
    try:
        with Image.open(path) as img:
            arr = np.asarray(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise data_error(path, f"cannot read the label PNG ({e}). Re-run `dida convert --force` "
                               "or remove the sample.") from None
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim != 2:
        raise data_error(path, f"a train-id label must be single-channel, got shape {arr.shape}. "
                               "Point the dataset at the *_labelTrainIds.png files written by "
                               "`dida convert`.")
    if arr.dtype != np.uint8:
        if arr.size and arr.max() > 255:
            raise data_error(path, f"label values up to {arr.max()} do not fit train ids (0..255). "
                                   "Run `dida convert` to get *_labelTrainIds.png files.")
        arr = arr.astype(np.uint8)
    return arr


def check_train_ids(label: np.ndarray, path: str | os.PathLike[str], num_classes: int = NUM_CLASSES) -> None:
    """Raise ``DataError`` if ``label`` [H, W] holds values other than 0..num_classes-1 and 255."""
    bad = (label >= num_classes) & (label != IGNORE_INDEX)
    if bad.any():
        values = np.unique(label[bad])[:10].tolist()
        raise data_error(path, f"label holds values {values} outside the train ids 0..{num_classes - 1} "
                               f"and {IGNORE_INDEX}. This looks like a label-id file: run `dida convert` "
                               "and use the *_labelTrainIds.png outputs.")


# ------------------------------------------------------------------------------------------ numerics


def rescale_size(width: int, height: int, img_scale: Sequence[int]) -> tuple[int, int]:
    """mmcv ``rescale_size`` for a keep-ratio resize: the new (width, height).

    factor = min(max(L, S) / max(h, w), min(L, S) / min(h, w)); new size = (int(w*f + 0.5), int(h*f + 0.5)).
    """
    long_edge, short_edge = max(img_scale), min(img_scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(width * float(factor) + 0.5), int(height * float(factor) + 0.5)


def resize_keep_ratio(
    array: np.ndarray, img_scale: Sequence[int], interpolation: str = "bilinear"
) -> np.ndarray:
    """Keep-ratio resize of an image [H, W, C] uint8 ("bilinear") or label [H, W] ("nearest") with OpenCV."""
    h, w = array.shape[:2]
    new_w, new_h = rescale_size(w, h, img_scale)
    if min(new_w, new_h) < 1:
        raise DataError(
            f"an image of {w}x{h} pixels resizes to {new_w}x{new_h} at scale {tuple(img_scale)}: too thin to "
            "use. Remove it from the dataset."
        )
    flag = {"bilinear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}[interpolation]
    return cv2.resize(array, (new_w, new_h), interpolation=flag)


_MEAN = np.asarray(IMG_MEAN, dtype=np.float64)
_STD_INV = 1.0 / np.asarray(IMG_STD, dtype=np.float64)


def normalize(img_bgr: np.ndarray) -> np.ndarray:
    """mmcv ``imnormalize(to_rgb=True)``: float32 RGB [H, W, 3] = (rgb - mean) * (1 / std).

    Like mmcv (``cv2.subtract`` then ``cv2.multiply`` by the float64 reciprocal of std), so the result
    matches it bit for bit.
    """
    img = cv2.cvtColor(img_bgr, cv2.COLOR_BGR2RGB).astype(np.float32)
    cv2.subtract(img, _MEAN.reshape(1, -1), img)
    cv2.multiply(img, _STD_INV.reshape(1, -1), img)
    return img


def to_chw_tensor(img: np.ndarray) -> torch.Tensor:
    """[H, W, 3] float32 array -> contiguous float32 tensor [3, H, W]."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


def random_crop_box(
    label: np.ndarray, crop_size: Sequence[int], cat_max_ratio: float, rng: np.random.Generator,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[int, int, int, int]:
    """mmseg ``RandomCrop`` box (y1, y2, x1, x2) for a label [H, W] and crop (height, width).

    Offsets: y then x, each ``rng.integers(0, margin + 1)``. With ``cat_max_ratio < 1`` the box is
    redrawn up to 10 times until the crop holds more than one non-ignore class and the largest one
    covers less than ``cat_max_ratio`` of the non-ignore pixels; otherwise the last drawn box is used.
    """
    crop_h, crop_w = crop_size
    margin_h = max(label.shape[0] - crop_h, 0)
    margin_w = max(label.shape[1] - crop_w, 0)

    def draw() -> tuple[int, int, int, int]:
        y = int(rng.integers(0, margin_h + 1))
        x = int(rng.integers(0, margin_w + 1))
        return y, y + crop_h, x, x + crop_w

    box = draw()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            y1, y2, x1, x2 = box
            counts = np.bincount(label[y1:y2, x1:x2].ravel(), minlength=256)
            counts[ignore_index] = 0
            present = counts[counts > 0]
            if len(present) > 1 and present.max() / present.sum() < cat_max_ratio:
                break
            box = draw()
    return box


def pad_to(img: np.ndarray, label: np.ndarray, size: Sequence[int], ignore_index: int = IGNORE_INDEX
           ) -> tuple[np.ndarray, np.ndarray]:
    """Pad image [H, W, 3] with 0 and label [H, W] with ``ignore_index`` at the bottom/right to (h, w)."""
    pad_h = max(size[0] - img.shape[0], 0)
    pad_w = max(size[1] - img.shape[1], 0)
    if pad_h == 0 and pad_w == 0:
        return img, label
    img = np.pad(img, ((0, pad_h), (0, pad_w), (0, 0)), constant_values=0)
    label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=ignore_index)
    return img, label


# ------------------------------------------------------------------------------- pseudo-label margins

# Quirk Q17: the reference creates the validity mask on this (height, width) canvas whatever the image size.
REFERENCE_MARGIN_CANVAS = (1024, 2048)


def margin_mask(height: int, width: int, margins: Sequence[int]) -> np.ndarray:
    """uint8 ``[height, width]``: 1 inside, 0 on the ``(top, bottom, left, right)`` margins (in pixels)."""
    top, bottom, left, right = (int(m) for m in margins)
    mask = np.ones((height, width), dtype=np.uint8)
    mask[:top] = 0
    mask[max(height - bottom, 0):] = 0
    mask[:, :left] = 0
    mask[:, max(width - right, 0):] = 0
    return mask


class PseudoMarginMask:
    """HRDA's pseudo-label validity mask before the pipeline ("plcrop v2", hrda_mic.md 2.3).

    The mask is made at full resolution and then goes through the target pipeline with the image: resized
    (nearest), cropped and flipped with the same draws (``TrainPipeline.random_part_masked``), and padded.

    Args:
        margins: ``(top, bottom, left, right)`` in pixels of the canvas.
        canvas: ``"reference"``: the reference's fixed 1024x2048 canvas (quirk Q17), which the keep-ratio
            resize scales by its own factor, so it matches 2:1 images only, and padding fills 255 (the
            weight would be multiplied by 255 there, as in the reference); ``"image"``: a canvas of the
            loaded image's size, padding fills 0.

    Call: ``mask(image_height, image_width)`` -> uint8 ``[h, w]`` at the canvas size.
    """

    def __init__(self, *, margins: Sequence[int], canvas: Literal["reference", "image"]) -> None:
        margins = tuple(int(m) for m in margins)
        if len(margins) != 4 or min(margins) < 0:
            raise ValueError(f"PseudoMarginMask: margins must be four sizes >= 0, got {margins}")
        if canvas not in ("reference", "image"):
            raise ValueError(f"PseudoMarginMask: canvas must be 'reference' or 'image', got {canvas!r}")
        self.margins = margins
        self.canvas: Literal["reference", "image"] = canvas
        self.pad_value = 255 if canvas == "reference" else 0

    def __repr__(self) -> str:
        return f"PseudoMarginMask(margins={self.margins}, canvas={self.canvas!r})"

    def __call__(self, height: int, width: int) -> np.ndarray:
        h, w = REFERENCE_MARGIN_CANVAS if self.canvas == "reference" else (int(height), int(width))
        return margin_mask(h, w, self.margins)


# ------------------------------------------------------------------------------------------ pipelines


class TrainPipeline:
    """Resize(keep ratio) -> RandomCrop(cat_max_ratio) -> Flip -> Normalize -> Pad (mmseg semantics).

    Args:
        img_scale: (long, short) keep-ratio scale, e.g. (1280, 720) for GTA, (1024, 512) for Cityscapes.
        crop_size: (height, width).
        cat_max_ratio: largest share of one class in a crop (1.0 = a single draw).
        flip_prob: probability of a horizontal flip.

    Call: ``(img_bgr [H, W, 3] uint8, label [H, W] uint8, rng)`` ->
    ``(img [3, h, w] float32, label [h, w] int64)``.
    """

    def __init__(self, img_scale: Sequence[int], crop_size: Sequence[int], cat_max_ratio: float = 1.0,
                 flip_prob: float = 0.5, ignore_index: int = IGNORE_INDEX) -> None:
        self.img_scale = tuple(int(s) for s in img_scale)
        self.crop_size = tuple(int(s) for s in crop_size)
        self.cat_max_ratio = float(cat_max_ratio)
        self.flip_prob = float(flip_prob)
        self.ignore_index = ignore_index

    def __repr__(self) -> str:
        return (f"TrainPipeline(img_scale={self.img_scale}, crop_size={self.crop_size}, "
                f"cat_max_ratio={self.cat_max_ratio}, flip_prob={self.flip_prob})")

    def resize(self, img_bgr: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The deterministic part: keep-ratio resize of image (bilinear, uint8) and label (nearest)."""
        img_bgr = resize_keep_ratio(img_bgr, self.img_scale, "bilinear")
        return img_bgr, resize_keep_ratio(label, self.img_scale, "nearest")

    def resize_mask(self, mask: np.ndarray) -> np.ndarray:
        """Keep-ratio nearest resize of an extra map [h, w] by ITS OWN factor, as mmseg resizes every
        segmentation field (a mask whose size differs from the image's keeps differing, quirk Q17)."""
        return resize_keep_ratio(mask, self.img_scale, "nearest")

    def _crop_flip(self, img_bgr: np.ndarray, label: np.ndarray, mask: np.ndarray | None,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The random crop box (drawn from ``label``) and the flip draw, applied to all given maps alike."""
        y1, y2, x1, x2 = random_crop_box(label, self.crop_size, self.cat_max_ratio, rng, self.ignore_index)
        img_bgr, label = img_bgr[y1:y2, x1:x2], label[y1:y2, x1:x2]
        mask = None if mask is None else mask[y1:y2, x1:x2]
        # mmseg's RandomFlip draws even when prob is 0; so do we, to keep the random stream aligned.
        if rng.random() < self.flip_prob:
            img_bgr, label = img_bgr[:, ::-1], label[:, ::-1]
            mask = None if mask is None else mask[:, ::-1]
        return img_bgr, label, mask

    def random_part(self, img_bgr: np.ndarray, label: np.ndarray, rng: np.random.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Crop, flip, normalise, pad an already resized pair (the part that consumes ``rng``)."""
        img_bgr, label, _ = self._crop_flip(img_bgr, label, None, rng)
        img = normalize(np.ascontiguousarray(img_bgr))
        img, label = pad_to(img, label, self.crop_size, self.ignore_index)
        return to_chw_tensor(img), torch.from_numpy(label.astype(np.int64))

    def random_part_masked(self, img_bgr: np.ndarray, label: np.ndarray, mask: np.ndarray,
                           rng: np.random.Generator, *, pad_value: int
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``random_part`` that carries an extra uint8 map [h, w] (resized like the label) through the same
        crop and flip, with the same draws from ``rng`` as ``random_part``; padded with ``pad_value``.

        Returns:
            ``(img [3, h, w] float32, label [h, w] int64, mask [h, w] uint8)``.
        """
        if mask.shape != label.shape:
            raise DataError(f"the extra map {mask.shape} and the label {label.shape} differ in size after resizing.")
        img_bgr, label, cropped = self._crop_flip(img_bgr, label, mask, rng)
        assert cropped is not None
        img = normalize(np.ascontiguousarray(img_bgr))
        img, label = pad_to(img, label, self.crop_size, self.ignore_index)
        pad_h, pad_w = max(self.crop_size[0] - cropped.shape[0], 0), max(self.crop_size[1] - cropped.shape[1], 0)
        if pad_h or pad_w:
            cropped = np.pad(cropped, ((0, pad_h), (0, pad_w)), constant_values=pad_value)
        return to_chw_tensor(img), torch.from_numpy(label.astype(np.int64)), torch.from_numpy(
            np.ascontiguousarray(cropped, dtype=np.uint8))

    def __call__(self, img_bgr: np.ndarray, label: np.ndarray, rng: np.random.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if img_bgr.shape[:2] != label.shape[:2]:
            raise DataError(f"image {img_bgr.shape[:2]} and label {label.shape[:2]} sizes differ.")
        return self.random_part(*self.resize(img_bgr, label), rng)


class TestPipeline:
    """Keep-ratio resize (bilinear, uint8) -> Normalize; no pad. ``(img_bgr) -> float32 [3, h, w]``."""

    def __init__(self, img_scale: Sequence[int] = (1024, 512)) -> None:
        self.img_scale = tuple(int(s) for s in img_scale)

    def __repr__(self) -> str:
        return f"TestPipeline(img_scale={self.img_scale})"

    def __call__(self, img_bgr: np.ndarray) -> torch.Tensor:
        return to_chw_tensor(normalize(resize_keep_ratio(img_bgr, self.img_scale, "bilinear")))


def preprocess_test_image(
    path: str | os.PathLike[str], img_scale: Sequence[int] = (1024, 512)
) -> torch.Tensor:
    """Load an image file and apply the test pipeline: float32 [3, H, W] (2048x1024 -> [3, 512, 1024])."""
    return TestPipeline(img_scale)(load_image(path))
