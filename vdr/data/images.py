"""Page images from any column value (``datasets.Image`` bytes, a file path, a PIL image) to RGB, with clear errors.

A page decodes as a viewer shows it: the EXIF orientation of a photographed page is applied (as the HF
``load_image`` does), 16-bit greyscale is scaled to 8 bits and transparency is composited on white. A header that
claims more than ``MAX_IMAGE_PIXELS`` fails before any pixel is decoded.

Pages are hashed by their encoded bytes: the hash identifies a page wherever it appears in a batch, which is what
false-negative masking needs (the same page as another row's positive, or among the hard negatives).
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from vdr.data.errors import DataError
from vdr.data.pages import MAX_ASPECT_RATIO

# A page larger than this is a decompression bomb or a scanning accident, not a document page (an A4 page scanned at
# 600 dpi is 35M pixels). PIL's own default bound, so PIL's bomb warning and our check agree on one limit.
MAX_IMAGE_PIXELS = 89_478_485
# What a file that is not a page raises while it is opened, checked or decoded.
_DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError)


@dataclass
class EncodedImage:
    """An image still in its file encoding, with where it came from (for error messages)."""

    data: bytes
    origin: str  # a path, or "<bytes>"

    @property
    def key(self) -> int:
        """A 63-bit content hash (fits int64)."""
        return int.from_bytes(hashlib.blake2b(self.data, digest_size=8).digest(), "little") >> 1


def read_encoded(value, *, dataset: str, row: int, column: str, root: str | None = None) -> EncodedImage:
    """Turns a column value into encoded bytes without decoding the pixels.

    Accepts ``{"bytes": ..., "path": ...}`` (``datasets.Image(decode=False)``), a path string (relative paths are
    resolved against ``root``), raw bytes, or a PIL image (re-encoded as PNG).
    """
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        if value.get("bytes"):
            return EncodedImage(value["bytes"], value.get("path") or "<bytes>")
        value = value.get("path")
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return EncodedImage(buffer.getvalue(), "<PIL image>")
    if isinstance(value, bytes | bytearray):
        return EncodedImage(bytes(value), "<bytes>")
    if isinstance(value, str) and value:
        path = value if os.path.isabs(value) or root is None else os.path.join(root, value)
        try:
            with open(path, "rb") as handle:
                return EncodedImage(handle.read(), path)
        except OSError as error:
            raise DataError(dataset, f"cannot read image file {path!r}: {error.strerror}", row=row,
                            column=column) from error
    raise DataError(
        dataset, f"expected an image (datasets.Image, a file path or bytes), got {type(value).__name__}: "
        f"{str(value)[:60]!r}", row=row, column=column,
    )


def to_rgb(image: Image.Image) -> Image.Image:
    """Converts any PIL mode to RGB as the HF image processors of transformers >= 5.21 do: an image with an alpha band
    or a transparency key is composited on white (what a rendered page shows, and what Qwen's own ``qwen-vl-utils``
    does with RGBA), any other is converted by PIL. Earlier processors drop the alpha band; the collators convert
    pages here first, so both page routes agree on every version.

    One deliberate difference: 16-bit greyscale is scaled to 8 bits (what a viewer shows), where the processors' PIL
    conversion clips every value above 255 and turns a 16-bit scan white.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda v: v / 256).convert("L")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _check_size(encoded: EncodedImage, size: tuple[int, int], *, dataset: str, row: int, column: str) -> None:
    width, height = size
    if width * height > MAX_IMAGE_PIXELS:
        raise DataError(dataset, f"image {encoded.origin} is {width}x{height} pixels, more than "
                        f"{MAX_IMAGE_PIXELS} allowed", row=row, column=column)
    if width < 1 or height < 1:
        raise DataError(dataset, f"image {encoded.origin} is empty ({width}x{height})", row=row, column=column)
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise DataError(dataset, f"image {encoded.origin} is {width}x{height} pixels: Qwen3-VL's resize refuses "
                        f"aspect ratios beyond {MAX_ASPECT_RATIO}:1 (crop or split the page)", row=row, column=column)


def _open(encoded: EncodedImage, *, dataset: str, row: int, column: str) -> Image.Image:
    """Opens the header. PIL checks the size there first: its decompression-bomb error, and its warning (the same
    bound as ``MAX_IMAGE_PIXELS`` by default), become a ``DataError`` naming the row."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(encoded.data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise DataError(dataset, f"image {encoded.origin} is larger than a page can be: {error}", row=row,
                        column=column) from error
    except UnidentifiedImageError as error:  # PIL's message names a BytesIO object; say what the file holds instead
        what = "is empty (0 bytes)" if not encoded.data else f"starts with {encoded.data[:16]!r}"
        raise UnidentifiedImageError(f"not an image in a format PIL reads: the file {what}") from error


def decode(encoded: EncodedImage, *, dataset: str, row: int, column: str) -> Image.Image:
    """Decodes to an RGB PIL image in its displayed orientation, or raises a ``DataError`` naming the row and column."""
    try:
        with _open(encoded, dataset=dataset, row=row, column=column) as image:
            # Before the pixels: a bomb fails here. A quarter turn swaps the sides, which no check here depends on.
            _check_size(encoded, image.size, dataset=dataset, row=row, column=column)
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # EXIF Orientation 2-8: the page as a viewer shows it
            return to_rgb(image)
    except DataError:
        raise
    except _DECODE_ERRORS as error:
        raise DataError(dataset, f"cannot decode image {encoded.origin}: {error}", row=row, column=column) from error


def verify(encoded: EncodedImage, *, dataset: str, row: int, column: str) -> None:
    """Cheap up-front check: the header parses, the size is one a page can have, and the file is not truncated (no
    pixel decoding for PNG)."""
    try:
        with _open(encoded, dataset=dataset, row=row, column=column) as image:
            _check_size(encoded, image.size, dataset=dataset, row=row, column=column)
            image.verify()
    except DataError:
        raise
    except _DECODE_ERRORS as error:
        raise DataError(dataset, f"corrupt image {encoded.origin}: {error}", row=row, column=column) from error
