"""``vdr data from-pdf``: every page of a folder of PDFs as a ``datasets`` dataset of page images and their text.

Each document is rendered by pypdfium2 (PDFium, the renderer of Chromium) in a worker process and saved as its own
shard under ``OUTPUT/documents``; the shards are then joined into ``OUTPUT/pages``, with columns ``image`` (PNG),
``doc_id``, ``page`` (from 1), ``text`` (the page's text layer, empty for a scan), ``width``, ``height`` and
``source`` (the file). A document's shard is written under a temporary name and renamed when whole, and records the
file's size and modification time with the render settings: a second run skips documents already rendered (a crash
or Ctrl-C loses at most the documents in flight) and redoes those whose file or settings changed. ``pages`` is
replaced only once the new one is complete.

Pages render at ``dpi`` unless that would exceed ``max_pixels``, in which case they render smaller, at the size that
fits (PDFium draws at the target size; no full-resolution bitmap is made first): an A0 poster at 144 dpi would
otherwise be 22 megapixels.

Files that cannot be used (not a PDF, encrypted, corrupt, no pages) are named with the reason, skipped and counted;
pages whose text layer is empty are kept (the image is what the model reads) and counted, since ``vdr data queries``
cannot derive queries from their text. ``OUTPUT/summary.json`` holds the counts and every skipped file.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vdr.data.writing import quiet_datasets, write_dataset

MARKER = "from-pdf.json"  # settings of the run, at the output's root: marks a directory as ours
PDF_MAGIC = b"%PDF-"


@dataclass(frozen=True)
class RenderSettings:
    dpi: float = 144.0  # 1654 x 1240 px for an A4 page... at most max_pixels
    max_pixels: int = 2_000_000

    def scale(self, width_pt: float, height_pt: float) -> float:
        """Pixels per PDF point: ``dpi / 72``, reduced so that the page holds at most ``max_pixels``."""
        scale = self.dpi / 72
        area = width_pt * height_pt * scale * scale
        if area > self.max_pixels:
            scale *= (self.max_pixels / area) ** 0.5
            # PDFium rounds the bitmap's sides up: shrink until the rounded sides fit too.
            while math.ceil(width_pt * scale) * math.ceil(height_pt * scale) > self.max_pixels:
                scale *= 0.998
        return scale


@dataclass
class DocumentResult:
    """What rendering one file gave: its pages, or why it was skipped."""

    source: str
    doc_id: str
    pages: int = 0
    pages_without_text: list[int] = field(default_factory=list)
    pages_failed: dict[int, str] = field(default_factory=dict)
    skipped: str | None = None  # the reason, when the whole file was skipped
    reused: bool = False  # rendered by an earlier run


def find_documents(inputs: list[str], exclude: Path | None = None) -> list[tuple[Path, str]]:
    """``(file, doc_id)`` for every file under ``inputs`` (files or folders, searched recursively), sorted.

    A document's id is its path relative to the folder it was found in (without ``.pdf``), or its file name's stem.
    Every file is returned, PDF or not: files that are not PDFs are reported as skipped rather than silently ignored.
    A file reached twice (overlapping inputs) keeps its first id; files under ``exclude`` (the output) are left out.
    """
    found: dict[str, Path] = {}
    seen: set[Path] = set()
    excluded = exclude.resolve() if exclude is not None else None
    for entry in inputs:
        root = Path(entry)
        if not root.exists():
            raise FileNotFoundError(f"--input {entry}: no such file or folder")
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            real = path.resolve()
            if real in seen or (excluded is not None and real.is_relative_to(excluded)):
                continue
            seen.add(real)
            relative = path.name if root.is_file() else path.relative_to(root).as_posix()
            doc_id = relative[:-4] if relative.lower().endswith(".pdf") else relative
            if doc_id in found and found[doc_id].resolve() != path.resolve():
                raise ValueError(f"two inputs give the document id {doc_id!r}: {found[doc_id]} and {path}; "
                                 "pass them under different folders")
            found[doc_id] = path
    return sorted(((path, doc_id) for doc_id, path in found.items()), key=lambda item: item[1])


def shard_name(doc_id: str) -> str:
    """A file-system-safe, collision-free directory name for a document's shard."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", doc_id)[:80]
    return f"{readable}-{hashlib.sha1(doc_id.encode()).hexdigest()[:10]}"


def _fingerprint(path: Path, settings: RenderSettings) -> dict:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, **asdict(settings)}


def _features():
    import datasets

    return datasets.Features({
        "image": datasets.Image(),
        "doc_id": datasets.Value("string"),
        "page": datasets.Value("int32"),
        "text": datasets.Value("string"),
        "width": datasets.Value("int32"),
        "height": datasets.Value("int32"),
        "source": datasets.Value("string"),
    })


def render_document(path: Path, doc_id: str, shard: Path, settings: RenderSettings) -> DocumentResult:
    """Renders one file into ``shard`` (a saved dataset, written whole or not at all); reuses an up-to-date shard."""
    import pypdfium2 as pdfium

    result = DocumentResult(str(path), doc_id)
    meta_path = shard / "document.json"
    fingerprint = _fingerprint(path, settings)
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") == fingerprint:
            saved = meta["result"]
            saved["pages_failed"] = {int(k): v for k, v in saved["pages_failed"].items()}  # JSON keys are strings
            return DocumentResult(**{**saved, "reused": True})
    with open(path, "rb") as handle:
        head = handle.read(1024)
    if PDF_MAGIC not in head:
        result.skipped = "not a PDF (no %PDF- header in its first 1024 bytes)"
        return result
    try:
        document = pdfium.PdfDocument(str(path))
    except pdfium.PdfiumError as error:
        message = str(error)
        if "password" in message.lower():
            result.skipped = "encrypted: it needs a password"
        elif getattr(error, "err_code", None) == 0:  # PDFium failed without a reason: it finds no page to load
            result.skipped = "the PDF has no pages (or a page tree PDFium cannot read)"
        else:
            result.skipped = f"corrupt or unreadable PDF ({message})"
        return result
    try:
        if len(document) == 0:
            result.skipped = "the PDF has no pages"
            return result

        def rows() -> Iterator[dict]:  # one page at a time: write_dataset holds at most a chunk of them
            for index in range(len(document)):
                number = index + 1
                try:
                    page = document[index]
                    width_pt, height_pt = page.get_size()
                    if width_pt <= 0 or height_pt <= 0:
                        raise ValueError(f"page size {width_pt} x {height_pt} pt")
                    image = page.render(scale=settings.scale(width_pt, height_pt)).to_pil().convert("RGB")
                    text = page.get_textpage().get_text_range().replace("\r\n", "\n").strip()
                except Exception as error:  # one bad page does not cost the document
                    result.pages_failed[number] = f"{type(error).__name__}: {error}"
                    continue
                if not text:
                    result.pages_without_text.append(number)
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                result.pages += 1
                yield {"image": {"bytes": buffer.getvalue(), "path": None}, "doc_id": doc_id, "page": number,
                       "text": text, "width": image.width, "height": image.height, "source": str(path)}

        staging = shard.with_name(f"{shard.name}.tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        write_dataset(rows(), _features(), staging)
    finally:
        document.close()
    if not result.pages:
        shutil.rmtree(staging, ignore_errors=True)
        result.skipped = f"no page could be rendered ({len(result.pages_failed)} failed)"
        return result
    (staging / "document.json").write_text(json.dumps({"fingerprint": fingerprint, "result": asdict(result)}))
    shutil.rmtree(shard, ignore_errors=True)  # an outdated render of this document
    os.replace(staging, shard)
    return result


def _render_job(job: tuple[str, str, str, RenderSettings]) -> DocumentResult:
    path, doc_id, shard, settings = job
    try:
        return render_document(Path(path), doc_id, Path(shard), settings)
    except Exception as error:  # never lose the run to one file
        return DocumentResult(path, doc_id, skipped=f"failed: {type(error).__name__}: {error}")


def from_pdf(inputs: list[str], output: str | os.PathLike, settings: RenderSettings = RenderSettings(),
             workers: int = 0, progress: bool = True) -> dict:
    """Renders every PDF under ``inputs`` into ``output`` (see the module docstring); returns the summary."""
    import datasets
    from tqdm.auto import tqdm

    from vdr.data.writing import move_into_place, temporary_sibling

    if settings.dpi <= 0 or settings.max_pixels < 1:
        raise ValueError(f"--dpi must be > 0 and --max-pixels >= 1, got {settings.dpi} and {settings.max_pixels}")
    output = Path(output)
    if output.is_file():
        raise FileExistsError(f"--output {output} is a file")
    if output.is_dir() and any(output.iterdir()) and not (output / MARKER).is_file():
        raise FileExistsError(f"--output {output} is not empty and was not written by `vdr data from-pdf` "
                              f"(no {MARKER}); choose a new folder")
    documents = find_documents(inputs, exclude=output)
    if not documents:
        raise ValueError(f"no files under {', '.join(inputs)}")
    (output / "documents").mkdir(parents=True, exist_ok=True)
    for leftover in (output / "documents").glob("*.tmp-*"):  # shards of a run that was killed mid-write
        shutil.rmtree(leftover, ignore_errors=True)
    (output / MARKER).write_text(json.dumps({"inputs": inputs, **asdict(settings)}, indent=2))
    jobs = [(str(path), doc_id, str(output / "documents" / shard_name(doc_id)), settings) for path, doc_id in documents]
    start = time.perf_counter()
    results: list[DocumentResult] = []
    bar = tqdm(total=len(jobs), unit="doc", desc="rendering", disable=not progress)
    if workers > 0:
        results += _render_in_processes(jobs, workers, bar)
    else:
        for job in jobs:
            results.append(_report(_render_job(job), bar))
    bar.close()
    results.sort(key=lambda r: r.doc_id)
    rendered = [r for r in results if r.skipped is None]
    if not rendered:
        shutil.rmtree(output / "pages", ignore_errors=True)  # no document left: no stale table for `vdr data queries`
    else:
        shards = [datasets.load_from_disk(str(output / "documents" / shard_name(r.doc_id))) for r in rendered]
        staging = temporary_sibling(output / "pages")
        with quiet_datasets():
            datasets.concatenate_datasets(shards).save_to_disk(str(staging))
        move_into_place(staging, output / "pages")
    summary = {
        "documents": len(rendered),
        "documents_reused": sum(r.reused for r in rendered),
        "pages": sum(r.pages for r in rendered),
        "pages_without_text": sum(len(r.pages_without_text) for r in rendered),
        "pages_failed": sum(len(r.pages_failed) for r in rendered),
        "files_skipped": len(results) - len(rendered),
        "skipped": {r.source: r.skipped for r in results if r.skipped is not None},
        "without_text": {r.doc_id: r.pages_without_text for r in rendered if r.pages_without_text},
        "failed_pages": {r.doc_id: r.pages_failed for r in rendered if r.pages_failed},
        "seconds": round(time.perf_counter() - start, 1),
        "settings": asdict(settings),
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _render_in_processes(jobs: list, workers: int, bar) -> list[DocumentResult]:
    """Renders ``jobs`` in ``workers`` processes. A process that dies (PDFium crashing on a hostile file, the kernel
    killing it for memory) breaks the pool: the documents it left unfinished are tried again one process each, and
    one that kills its process again is skipped and named."""
    context = multiprocessing.get_context("spawn")  # PDFium is initialised at import: no fork of it
    results, unfinished = [], []
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = {pool.submit(_render_job, job): job for job in jobs}
        for future in as_completed(futures):
            try:
                results.append(_report(future.result(), bar))
            except BrokenProcessPool:
                unfinished.append(futures[future])
    for job in sorted(unfinished, key=lambda j: j[1]):
        with ProcessPoolExecutor(1, mp_context=context) as alone:
            try:
                result = alone.submit(_render_job, job).result()
            except BrokenProcessPool:
                result = DocumentResult(job[0], job[1], skipped="its renderer process died (crash or out of memory)")
        results.append(_report(result, bar))
    return results


def _report(result: DocumentResult, bar) -> DocumentResult:
    """Names a skipped file or a problem page as soon as it is known (above the progress bar)."""
    if result.skipped is not None:
        bar.write(f"skipped {result.source}: {result.skipped}")
    for number, reason in result.pages_failed.items():
        bar.write(f"{result.source}: page {number} not rendered: {reason}")
    if result.pages_without_text:
        bar.write(f"{result.source}: {len(result.pages_without_text)} of {result.pages} pages have no text layer "
                  f"(pages {', '.join(map(str, result.pages_without_text[:10]))}"
                  f"{', ...' if len(result.pages_without_text) > 10 else ''})")
    bar.update(1)
    return result


def main(argv: list[str] | None = None) -> int:
    """``vdr data from-pdf``."""
    defaults = RenderSettings()
    parser = argparse.ArgumentParser(prog="vdr data from-pdf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="PDF files or folders (searched recursively)")
    parser.add_argument("--output", required=True, help="destination folder (a second run resumes)")
    parser.add_argument("--dpi", type=float, default=defaults.dpi, help="render resolution (default %(default)s)")
    parser.add_argument("--max-pixels", type=int, default=defaults.max_pixels,
                        help="largest page area in pixels; larger pages render smaller (default %(default)s)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="render processes (0: in this process; default %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    try:
        summary = from_pdf(args.input, args.output, RenderSettings(args.dpi, args.max_pixels), args.workers,
                           progress=not args.no_progress)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{summary['pages']} pages of {summary['documents']} documents in {args.output}/pages "
          f"({summary['documents_reused']} documents from an earlier run); {summary['files_skipped']} files skipped, "
          f"{summary['pages_without_text']} pages without a text layer, {summary['pages_failed']} pages failed; "
          f"{summary['seconds']} s. Details: {args.output}/summary.json")
    return 0 if summary["documents"] else 1
