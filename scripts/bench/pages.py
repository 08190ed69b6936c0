"""Pages per second from encoded page files to Qwen3-VL patches: the HF processor in DataLoader workers vs our path.

Every route starts from the same PNG files in memory and ends with float32 patches and ``image_grid_thw`` where the
model reads them (the CPU, or the GPU with ``--device cuda``):
- ``processor:N``: N DataLoader workers decode and run the HF image processor (torchvision backend, on the CPU);
  the main process moves the patches to the device.
- ``device:N``: N workers decode and pack the pages' uint8 pixels (``vdr.data.pages.Pages``); the main process moves
  the bytes and makes the patches there (``Pages.pixel_values``), as a training step does at its forward.
N = 0 runs everything in the main process. Pages are document-like (white, text lines, a chart) in the sizes of
rendered PDFs and scans: letter and A4 at 150 dpi, A4 at 300 dpi (above max_pixels), slides, receipts.

    python scripts/bench/pages.py --routes processor:0 processor:2 device:0 device:2
    python scripts/bench/pages.py --device cuda --routes processor:8 processor:16 device:4 device:8 --pages 2048

Prints pages/s per route and the ratio of each device route to the best processor route; then the preprocessing
alone (pages already decoded, one process, no DataLoader): milliseconds per page for the processor on the CPU and
for our path on ``--device``, and their ratio. ``--out`` appends JSON lines. Not a test: speed is measured here,
correctness in tests/test_pages.py.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import time

import torch
from PIL import Image, ImageDraw

from vdr.data.images import EncodedImage, decode
from vdr.data.pages import PageFormat, Pages
from vdr.models.processor import build_processor

# (width, height): letter and A4 at 150 dpi, A4 at 300 dpi, a 16:9 slide, a receipt, a landscape table.
SIZES = [(1275, 1650), (1240, 1754), (2480, 3508), (1920, 1080), (600, 1800), (1650, 1275)]
WORDS = "revenue profit margin cash flow assets equity debt growth forecast segment quarter annual report".split()


def document(size: tuple[int, int], seed: int) -> bytes:
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    for line in range(3, height // 22):
        words = " ".join(WORDS[(seed + line + i) % len(WORDS)] for i in range(max(1, width // 90)))
        draw.text((40, line * 20), words, fill="black")
    for bar in range(8):
        top = height - 60 - (seed * 7 + bar * 13) % (height // 4)
        draw.rectangle([width // 2 + bar * 30, top, width // 2 + bar * 30 + 20, height - 60], fill=(30 * bar, 90, 160))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class Files(torch.utils.data.Dataset):
    def __init__(self, files: list[bytes]) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Image.Image:
        return decode(EncodedImage(self.files[index], "<bench>"), dataset="bench", row=index, column="image")


class ProcessorCollate:
    def __init__(self, image_processor) -> None:
        self.image_processor = image_processor

    def __call__(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.image_processor(images=images, return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]


class PackCollate:
    def __init__(self, format: PageFormat) -> None:
        self.format = format

    def __call__(self, images: list[Image.Image]) -> Pages:
        return Pages.pack(images, self.format)


def run(route: str, workers: int, files: list[bytes], processor, args) -> dict:
    device = torch.device(args.device)
    collate = ProcessorCollate(processor.image_processor) if route == "processor" else PackCollate(
        PageFormat.of(processor.image_processor))
    loader = torch.utils.data.DataLoader(Files(files), batch_size=args.batch, collate_fn=collate, num_workers=workers,
                                         pin_memory=device.type == "cuda",
                                         prefetch_factor=4 if workers else None)
    pages = patches = 0
    started = None
    for i, batch in enumerate(loader):
        if route == "processor":
            pixel_values, grid = (t.to(device, non_blocking=True) for t in batch)
        else:
            moved = batch.to(device, non_blocking=True)
            pixel_values, grid = moved.pixel_values(), moved.grid_thw()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i == 0:  # worker start-up and first-batch warm-up are not timed
            started = time.perf_counter()
            continue
        pages += len(grid)
        patches += pixel_values.shape[0]
    elapsed = time.perf_counter() - started
    return {"route": f"{route}:{workers}", "device": args.device, "pages": pages,
            "pages_per_s": round(pages / elapsed, 2), "patches_per_page": round(patches / max(pages, 1), 1),
            "batch": args.batch, "max_pixels": args.max_pixels,
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
            "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine()}


def preprocessing_only(files: list[bytes], processor, args) -> dict:
    """Milliseconds per page from decoded pages to patches on the device: the processor (on the CPU, patches then
    moved) vs ours (uint8 pages moved, patches made there). Best of ``--repeats`` passes over ``--batch`` pages."""
    device = torch.device(args.device)
    images = [Files(files)[i] for i in range(args.batch)]
    format = PageFormat.of(processor.image_processor)

    def processor_route() -> None:
        processor.image_processor(images=images, return_tensors="pt")["pixel_values"].to(device)

    def our_route() -> None:
        Pages.pack(images, format).to(device).pixel_values()

    timings = {}
    for name, route in (("processor", processor_route), ("ours", our_route)):
        best = float("inf")
        for _ in range(args.repeats + 1):  # the first pass warms up (kernels, weight tables): not counted
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            route()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - started) if _ else best
        timings[name] = 1000 * best / len(images)
    return {"route": "preprocessing-only", "device": args.device, "batch": args.batch,
            "processor_ms_per_page": round(timings["processor"], 2), "ours_ms_per_page": round(timings["ours"], 2),
            "speedup": round(timings["processor"] / timings["ours"], 2), "max_pixels": args.max_pixels,
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None, "cpus": os.cpu_count()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--routes", nargs="+", default=["processor:0", "processor:2", "device:0", "device:2"],
                        help="ROUTE:WORKERS with ROUTE processor or device")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--pages", type=int, default=192, help="pages per route (the first batch is not timed)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--min-pixels", type=int, default=128 * 128)
    parser.add_argument("--max-pixels", type=int, default=600 * 600)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes of the preprocessing-only comparison")
    parser.add_argument("--out", help="append each route's record to this JSON-lines file")
    args = parser.parse_args()
    processor = build_processor(args.min_pixels, args.max_pixels)
    distinct = [document(SIZES[i % len(SIZES)], i) for i in range(2 * len(SIZES))]
    files = [distinct[i % len(distinct)] for i in range(args.pages + args.batch)]
    print(f"{len(files)} pages of {len(SIZES)} sizes, batch {args.batch}, max_pixels {args.max_pixels}, "
          f"patches made on {args.device}")
    records = []
    for spec in args.routes:
        route, workers = spec.split(":")
        if route not in ("processor", "device"):
            raise SystemExit(f"{spec!r}: expected processor:N or device:N")
        record = run(route, int(workers), files, processor, args)
        records.append(record)
        print(f"{record['route']:<14} {record['pages_per_s']:>9.1f} pages/s", flush=True)
        if args.out:
            with open(args.out, "a") as handle:
                handle.write(json.dumps(record) + "\n")
    best = max((r for r in records if r["route"].startswith("processor")), key=lambda r: r["pages_per_s"],
               default=None)
    if best:
        for record in records:
            if record["route"].startswith("device"):
                print(f"{record['route']}: {record['pages_per_s'] / best['pages_per_s']:.2f}x the pages/s of "
                      f"{best['route']}")
    record = preprocessing_only(files, processor, args)
    print(f"preprocessing only, {args.batch} decoded pages: processor on the CPU {record['processor_ms_per_page']:.2f} "
          f"ms/page, ours on {args.device} {record['ours_ms_per_page']:.2f} ms/page ({record['speedup']:.2f}x)")
    if args.out:
        with open(args.out, "a") as handle:
            handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
