"""Page images as uint8 pixels from the DataLoader workers, turned into Qwen3-VL patches on the training device.

The HF Qwen2-VL image processor, run in the workers, resizes, normalizes and patchifies every page on the CPU and
ships float32 patches (the page area twice over: Qwen3-VL's temporal patch duplicates each image) to the device.
Here the workers only decode: ``Pages.pack`` concatenates the pages' RGB bytes into one uint8 tensor, which moves to
the device in one copy, and ``Pages.pixel_values`` does the rest there as batched tensor ops: pages that share a size
are resized together, then normalized, patchified in the order Qwen3-VL's patch merger reads them, and written into
one ``[patches, 3 * 2 * 16 * 16]`` tensor.

Parity with the reference (tests/test_pages.py): the grid and the token count of every page come from the
processor's own ``smart_resize``, so they are identical. The pixels are identical too, bit for bit, to the processor
run on the CPU (how it runs in DataLoader workers and in Sentence Transformers at serving time): its torchvision
backend resizes uint8 pages with PyTorch's fixed-point antialiased bicubic kernel (Keys' cubic with a = -0.5, the
support widened by the scale when shrinking, weights rounded to int16 at the finest precision that fits, a horizontal
then a vertical pass, each rounded and clamped to [0, 255]). ``resize_fixed_point`` calls that kernel on the CPU and,
on a GPU (which has no uint8 bicubic kernel), ``resize_emulated``: the same integers from int32 tensor ops. Run on a
GPU, the processor itself takes a float32 bicubic route instead, which differs from its own CPU result by up to 16
levels on noise and up to 10 levels (in 2-4% of the values) on rendered pages; training on the CPU's pixels keeps
training and serving on the same ones.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# The aspect ratio beyond which Qwen2-VL's resize refuses a page.
MAX_ASPECT_RATIO = 200
# Pixels resized at once (the larger of a page's source and output size, summed over the pages of a chunk): a pass
# holds int32 sums and one int32 tap per channel of each, about 24 bytes a pixel: ~0.4 GB at this budget.
MAX_CHUNK_PIXELS = 1 << 24


def _smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's resize rule (for transformers releases that do not export it): both sides a multiple of
    ``factor``, the area within [min_pixels, max_pixels], the aspect ratio kept as closely as that allows."""
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got {ratio}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


try:  # the image processor's own function: the reference, wherever transformers keeps it
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
except ImportError:  # pragma: no cover - depends on the transformers release
    smart_resize = _smart_resize


@functools.lru_cache(maxsize=512)
def _bicubic_weights(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """PyTorch's uint8 antialiased bicubic weights for one axis: ``(index, weight, precision)``.

    ``index`` and ``weight`` are ``[out_size, taps]`` (int64 source pixels, int32 weights scaled by ``2**precision``);
    output pixel ``i`` is ``(sum_k weight[i, k] * x[index[i, k]] + 2**(precision - 1)) >> precision``, clamped to
    [0, 255]. Every step follows ATen's ``_compute_index_ranges_int16_weights`` in float64, operation for operation,
    so the rounded weights are the same integers.
    """
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0  # bicubic reaches 2 pixels, widened by the scale when shrinking
    taps = math.ceil(support) * 2 + 1
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    center = scale * (np.arange(out_size, dtype=np.float64) + 0.5)
    first = np.maximum((center - support + 0.5).astype(np.int64), 0)  # truncation, as C's cast
    size = np.clip(np.minimum((center + support + 0.5).astype(np.int64), in_size) - first, 0, taps)
    k = np.arange(taps)
    x = np.abs((k[None, :] + first[:, None] - center[:, None] + 0.5) * invscale)
    a = -0.5  # Keys' cubic as PIL uses it
    w = np.where(x < 1.0, ((a + 2) * x - (a + 3)) * x * x + 1,
                 np.where(x < 2.0, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))
    w = np.where(k[None, :] < size[:, None], w, 0.0)
    total = np.zeros(out_size)
    for tap in range(taps):  # summed in tap order, as the kernel does
        total = total + w[:, tap]
    nonzero = total != 0.0
    w = np.where(nonzero[:, None], w / np.where(nonzero, total, 1.0)[:, None], w)
    largest = float(w[nonzero].max()) if nonzero.any() else 0.0
    precision = 0
    while precision < 22 and int(0.5 + largest * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = w * (1 << precision)
    weight = np.where(scaled < 0, (scaled - 0.5).astype(np.int64), (scaled + 0.5).astype(np.int64))
    index = np.minimum(first[:, None] + k[None, :], in_size - 1)  # taps past the edge have weight 0
    return torch.from_numpy(index), torch.from_numpy(weight.astype(np.int32)), precision


def _resize_axis(pixels: torch.Tensor, out_size: int, dim: int) -> torch.Tensor:
    """One pass of :func:`resize_emulated` along ``dim`` (-1 or -2) of uint8 pixels; uint8 out."""
    index, weight, precision = _bicubic_weights(pixels.shape[dim], out_size)
    index, weight = index.to(pixels.device), weight.to(pixels.device)
    shape = [out_size] + [1] * (-1 - dim)  # weights broadcast along the resized dim
    total = torch.full((*pixels.shape[:dim], out_size, *pixels.shape[dim:][1:]), 1 << (precision - 1),
                       dtype=torch.int32, device=pixels.device)
    for tap in range(index.shape[1]):  # a few taps (2 x the shrink factor + 5): one gather and one fma each
        total += pixels.index_select(dim, index[:, tap]).to(torch.int32).mul_(weight[:, tap].view(shape))
    return (total >> precision).clamp_(0, 255).to(torch.uint8)


def resize_emulated(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """PyTorch's CPU uint8 antialiased bicubic resize of ``[..., H, W]`` uint8 pixels, computed with int32 tensor ops
    that run on any device: a horizontal pass, then a vertical one, each rounded and clamped to uint8."""
    if pixels.shape[-1] != width:
        pixels = _resize_axis(pixels, width, -1)
    if pixels.shape[-2] != height:
        pixels = _resize_axis(pixels, height, -2)
    return pixels


def resize_fixed_point(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resizes ``[N, C, H, W]`` uint8 pixels to ``height`` x ``width`` exactly as torchvision resizes uint8 images on
    the CPU with antialiased bicubic interpolation: with that very kernel on the CPU, elsewhere (a GPU has no uint8
    bicubic kernel) with :func:`resize_emulated`, which gives the same integers."""
    if pixels.device.type == "cpu":
        return F.interpolate(pixels, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return resize_emulated(pixels, height, width)


def _is_bicubic(resample) -> bool:
    name = getattr(resample, "name", None) or getattr(resample, "value", None)
    return resample == 3 or str(name).lower() == "bicubic"  # PIL's BICUBIC is 3; torchvision's mode is "bicubic"


@dataclass
class PageFormat:
    """How a Qwen3-VL image processor turns a page into patches: its size bounds, normalization and patch layout.

    Not frozen: Lightning rebuilds the dataclasses of a batch field by field when it moves them to a device.
    """

    min_pixels: int
    max_pixels: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale_factor: float = 1 / 255
    patch_size: int = 16
    merge_size: int = 2
    temporal_patch_size: int = 2

    @classmethod
    def of(cls, image_processor) -> PageFormat:
        """The format of a Qwen2-VL-style image processor, refusing settings the device path does not reproduce."""
        for flag in ("do_resize", "do_rescale", "do_normalize"):
            if getattr(image_processor, flag, True) is not True:
                raise ValueError(f"page_preprocessing 'device' reproduces processors with {flag}=True; this one has "
                                 f"{flag}={getattr(image_processor, flag)!r} (use page_preprocessing 'processor')")
        resample = getattr(image_processor, "resample", 3)
        if not _is_bicubic(resample):
            raise ValueError(f"page_preprocessing 'device' resizes bicubically like Qwen's processors; this one "
                             f"resamples with {resample!r} (use page_preprocessing 'processor')")
        backend = getattr(image_processor, "backend", None) or (
            "torchvision" if type(image_processor).__name__.endswith("Fast") else "pil")
        if backend != "torchvision":
            warnings.warn(f"{type(image_processor).__name__} resizes with PIL; page_preprocessing 'device' reproduces "
                          "the torchvision backend (Qwen2VLImageProcessor), whose pixels differ from PIL's by at most "
                          "one level in a few pixels", stacklevel=2)
        size = image_processor.size
        mean, std = image_processor.image_mean, image_processor.image_std
        return cls(
            min_pixels=int(size["shortest_edge"]), max_pixels=int(size["longest_edge"]),
            mean=tuple(float(v) for v in (mean if isinstance(mean, Sequence) else [mean] * 3)),
            std=tuple(float(v) for v in (std if isinstance(std, Sequence) else [std] * 3)),
            rescale_factor=float(image_processor.rescale_factor), patch_size=int(image_processor.patch_size),
            merge_size=int(image_processor.merge_size), temporal_patch_size=int(image_processor.temporal_patch_size),
        )

    def resized(self, height: int, width: int) -> tuple[int, int]:
        """A ``height`` x ``width`` page's size after the resize: sides multiples of 32, area within the bounds."""
        factor = self.patch_size * self.merge_size
        return smart_resize(height, width, factor=factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels)

    def grid(self, height: int, width: int) -> tuple[int, int, int]:
        """``(temporal, height, width)`` patches of a page: its ``image_grid_thw`` row."""
        resized_height, resized_width = self.resized(height, width)
        return 1, resized_height // self.patch_size, resized_width // self.patch_size

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size**2


def rgb_array(image: Image.Image | np.ndarray | torch.Tensor) -> np.ndarray:
    """``[H, W, 3]`` uint8 pixels of an RGB PIL image (or such an array)."""
    if isinstance(image, Image.Image) and image.mode != "RGB":
        raise ValueError(f"expected an RGB page (vdr.data.images.decode converts them), got mode {image.mode!r}")
    pixels = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ValueError(f"expected [H, W, 3] uint8 pixels, got {tuple(pixels.shape)} {pixels.dtype}")
    return pixels


@dataclass
class Pages:
    """Decoded pages of a batch, still as bytes: every page's ``[H, W, 3]`` uint8 pixels back to back.

    ``shapes`` is host-side bookkeeping (plain ints, so nothing reads a device tensor back to size the work).
    """

    pixels: torch.Tensor  # [sum of H * W * 3] uint8
    shapes: list[tuple[int, int]]  # (height, width) of each page, in order
    format: PageFormat

    @classmethod
    def pack(cls, images: Sequence[Image.Image | np.ndarray | torch.Tensor], format: PageFormat) -> Pages:
        """Concatenates the pages' pixels (in a DataLoader worker: one copy, no float conversion)."""
        arrays = [rgb_array(image) for image in images]
        shapes = [(int(a.shape[0]), int(a.shape[1])) for a in arrays]
        pixels = np.empty(sum(a.size for a in arrays), dtype=np.uint8)
        start = 0
        for array in arrays:  # one copy per page, into the batch's buffer
            pixels[start : start + array.size] = array.reshape(-1)
            start += array.size
        return cls(torch.from_numpy(pixels), shapes, format)

    def __len__(self) -> int:
        return len(self.shapes)

    def _starts(self) -> list[int]:
        starts = [0]
        for height, width in self.shapes:
            starts.append(starts[-1] + height * width * 3)
        return starts

    def grid_thw(self) -> torch.Tensor:
        """``[I, 3]`` int64 patches per page (the processor's ``image_grid_thw``)."""
        return torch.tensor([self.format.grid(h, w) for h, w in self.shapes], dtype=torch.int64).reshape(-1, 3)

    def select(self, start: int, stop: int) -> Pages:
        """Pages ``start`` to ``stop - 1`` (a view of the same bytes)."""
        starts = self._starts()
        return Pages(self.pixels[starts[start] : starts[stop]], self.shapes[start:stop], self.format)

    def pin_memory(self) -> Pages:
        return Pages(self.pixels.pin_memory(), self.shapes, self.format)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Pages:
        return Pages(self.pixels.to(device, non_blocking=non_blocking), self.shapes, self.format)

    def pixel_values(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[P, 3 * T * p * p]`` normalized patches of every page, in page order, computed where the bytes are.

        Pages of one size are resized as one batch. Patch order within a page is the processor's: blocks of
        ``merge x merge`` patches row by row (what the patch merger concatenates), each patch channel-major with its
        temporal copies, then rows and columns of pixels.
        """
        f, device = self.format, self.pixels.device
        p, m, t = f.patch_size, f.merge_size, f.temporal_patch_size
        grids = [f.grid(h, w) for h, w in self.shapes]
        patch_starts = np.cumsum([0] + [gh * gw for _, gh, gw in grids]).tolist()
        out = torch.empty(patch_starts[-1], f.patch_dim, dtype=dtype, device=device)
        # The processor's fused rescale + normalize: (x - mean / rescale) / (std / rescale), computed in float32.
        mean = (torch.tensor(f.mean, device=device) * (1.0 / f.rescale_factor)).view(1, 3, 1, 1)
        std = (torch.tensor(f.std, device=device) * (1.0 / f.rescale_factor)).view(1, 3, 1, 1)
        starts = self._starts()
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)  # pages of one size resize as one batch
        for i, shape in enumerate(self.shapes):
            groups[shape].append(i)
        chunks = []  # pages of one size, about MAX_CHUNK_PIXELS at a time (bounds the int32 temporaries)
        for (height, width), members in groups.items():
            _, grid_h, grid_w = grids[members[0]]
            step = max(1, MAX_CHUNK_PIXELS // max(height * width, grid_h * grid_w * p * p))
            chunks.extend(members[i : i + step] for i in range(0, len(members), step))
        for members in chunks:
            (height, width), (_, grid_h, grid_w) = self.shapes[members[0]], grids[members[0]]
            pages = torch.stack([self.pixels[starts[i] : starts[i + 1]].view(height, width, 3) for i in members])
            pages = pages.permute(0, 3, 1, 2)  # [n, 3, h, w]
            if (grid_h * p, grid_w * p) != (height, width):
                pages = resize_fixed_point(pages, grid_h * p, grid_w * p)
            pages = pages.to(torch.float32, memory_format=torch.contiguous_format).sub_(mean).div_(std)
            # [n, C, gh/m, m, p, gw/m, m, p] -> [n, gh/m, gw/m, m, m, C, (T), p, p]
            blocks = pages.view(len(members), 3, grid_h // m, m, p, grid_w // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
            blocks = blocks.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, t, -1, -1)
            for j, i in enumerate(members):
                target = out[patch_starts[i] : patch_starts[i + 1]]
                target.view(grid_h // m, grid_w // m, m, m, 3, t, p, p).copy_(blocks[j])
        return out
