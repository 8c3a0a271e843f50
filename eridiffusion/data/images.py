"""Image files: which ones we read, robust decoding to RGB, cheap header probes, loss masks.

Formats: whatever Pillow here decodes among `IMAGE_EXTENSIONS` (`.gif` and other animations
give their first frame); an extension Pillow has no plugin for is skipped with that reason.
Masks (`find_mask`): `NAME.mask.png` beside `NAME.ext`, else `masks/NAME.*` in the image's
folder; with `alpha_mask` an image without a mask file uses its alpha channel. A mask is 8-bit
grey after EXIF orientation, 255 = full loss weight, and is resized to its image's size.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from eridiffusion.errors import DatasetError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".jfif", ".avif")
MASK_SUFFIX = ".mask.png"  # NAME.mask.png beside NAME.png / NAME.jpg / ...
MASK_FOLDER = "masks"  # or masks/NAME.png in the image's folder (the scan does not enter it)
# Pixel limit against decompression bombs: 178,956,970 = 2 × PIL's Image.MAX_IMAGE_PIXELS
# default, the size at which PIL itself raises DecompressionBombError (e.g. 13,377 × 13,377).
# Checked on the header size, so a bomb is never decoded. We check it ourselves rather than
# change PIL's process-wide setting.
MAX_IMAGE_PIXELS = 178_956_970

SKIP_EMPTY = "empty file"
SKIP_NOT_IMAGE = "not an image"
SKIP_CORRUPT = "truncated or corrupt"
SKIP_BOMB = "over the pixel limit"
SKIP_UNSUPPORTED = "format not readable by this Pillow (add its plugin, e.g. pillow-avif-plugin)"

_EXIF_ORIENTATION = 0x0112
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageLoadError(DatasetError):
    """An image that passed the scan but cannot be decoded now (changed on disk, or verify=False)."""


class Skip(Exception):
    """A file the scan does not use; `reason` is one of the SKIP_* strings."""

    def __init__(self, reason: str):
        self.reason = reason


def is_image_name(name: str) -> bool:
    """An image file name we scan: a known extension, not hidden, not a `.mask.png`."""
    lower = name.lower()
    return not name.startswith(".") and lower.endswith(IMAGE_EXTENSIONS) and not lower.endswith(MASK_SUFFIX)


def readable(extension: str) -> bool:
    """Whether this Pillow has a decoder for files with `extension` (e.g. ".avif")."""
    return extension.lower() in Image.registered_extensions()


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB; alpha (or palette / colour-key transparency) composited on white.

    High bit-depth modes are scaled, not clipped: I;16 by 255/65535; I likewise when its values
    exceed 255; F is taken as [0, 1] when its maximum is ≤ 1, else as [0, 255].
    """
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float32)
        if mode.startswith("I;16") or (mode == "I" and values.max(initial=0) > 255):
            values = values * (255.0 / 65535.0)
        elif mode == "F" and values.max(initial=0) <= 1.0:
            values = values * 255.0
        image = Image.fromarray(np.clip(values + 0.5, 0, 255).astype(np.uint8), mode="L")
        mode = "L"
    if has_alpha(image):
        rgba = image.convert("RGBA")
        rgb = Image.new("RGB", rgba.size, (255, 255, 255))
        rgb.paste(rgba, mask=rgba.getchannel("A"))
        return rgb
    return image if mode == "RGB" else image.convert("RGB")


def has_alpha(image: Image.Image) -> bool:
    return image.mode in _ALPHA_MODES or "transparency" in image.info


def open_image(
    path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS, alpha: bool = False
) -> tuple[Image.Image, Image.Image | None]:
    """Decode `path` fully (first frame), EXIF orientation applied: (RGB image, its alpha as an
    "L" image when `alpha` and the image has one, else None)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > max_pixels:
                    raise Skip(SKIP_BOMB)
                im.load()
                image = ImageOps.exif_transpose(im)
        channel = image.convert("RGBA").getchannel("A") if alpha and has_alpha(image) else None
        return to_rgb(image), channel
    except Skip:
        raise ImageLoadError(
            f"{path}: image is over the {max_pixels:,}-pixel limit; downscale it or remove it"
        ) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageLoadError(f"{path}: cannot decode image ({e}); re-save or remove the file") from e


def open_rgb(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode `path` fully: EXIF orientation applied (`ImageOps.exif_transpose`), then RGB."""
    return open_image(path, max_pixels)[0]


def open_mask(path: str | os.PathLike, size: tuple[int, int], max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """A mask file as an 8-bit grey image of `size` (width, height), its image's size."""
    mask = open_rgb(path, max_pixels).convert("L")
    return mask if mask.size == size else mask.resize(size, Image.Resampling.BILINEAR)


def _orientation(im: Image.Image) -> int:
    """EXIF orientation (1–8) from the header; a PNG's EXIF is read only if it precedes the pixels."""
    if im.format == "PNG" and "exif" not in im.info:
        return 1  # PIL would decode the whole image to look for a trailing eXIf chunk
    try:
        return int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except (OSError, SyntaxError, ValueError, KeyError, TypeError):
        return 1


def probe(path: Path, max_pixels: int = MAX_IMAGE_PIXELS, verify: bool = True) -> tuple[int, int, bool]:
    """(height, width) after EXIF orientation and whether it has alpha, from the header; with
    `verify` a cheap integrity pass (JPEG decoded at 1/8 scale in DCT space, PNG chunk CRCs,
    other formats decoded). Raises Skip with the reason the file cannot be used."""
    try:
        if path.stat().st_size == 0:
            raise Skip(SKIP_EMPTY)
        if not readable(path.suffix):
            raise Skip(SKIP_UNSUPPORTED)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise Skip(SKIP_BOMB)
                if _orientation(im) in (5, 6, 7, 8):  # transposed or rotated by 90°
                    w, h = h, w
                alpha = has_alpha(im)
                if verify:
                    if im.format == "JPEG":
                        im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
                        im.load()
                    elif im.format == "PNG":
                        im.verify()
                    else:
                        im.load()
    except UnidentifiedImageError:
        raise Skip(SKIP_NOT_IMAGE) from None
    except Image.DecompressionBombError:
        raise Skip(SKIP_BOMB) from None
    except (OSError, SyntaxError, ValueError, EOFError):
        raise Skip(SKIP_CORRUPT) from None
    return h, w, alpha


def find_mask(image: Path, names: set[str], mask_names: dict[str, str]) -> Path | None:
    """The mask file of `image`: `NAME.mask.png` among `names` (its folder's files), else the
    file of stem NAME in its `masks/` folder (`mask_names`: stem → file name, .png first)."""
    beside = image.stem + MASK_SUFFIX
    if beside in names:
        return image.with_name(beside)
    if image.stem in mask_names:
        return image.parent / MASK_FOLDER / mask_names[image.stem]
    return None


def list_masks(folder: Path) -> dict[str, str]:
    """stem → file name of the images in `folder/masks` ({} when there is none); .png wins a tie."""
    masks = folder / MASK_FOLDER
    if not masks.is_dir():
        return {}
    out: dict[str, str] = {}
    for name in sorted(os.listdir(masks), key=lambda n: (not n.lower().endswith(".png"), n)):
        if is_image_name(name):
            out.setdefault(Path(name).stem, name)
    return out
