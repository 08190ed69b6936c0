"""How large a `vdr evaluate --report` gets, how long it takes to write, and how fast it opens in Chromium.

    python scripts/bench/report_load.py --queries 1000 --distractors 9 --image-size 512

Builds a synthetic eval set (cached under --work), two random rankings of it (the worst case for the report: each
query's top 10 are unrelated pages, so nearly every page of the corpus gets a thumbnail, and two runs are compared),
writes the report, then opens it in headless Chromium (scripts/report_browser.py) and times: the first page of 20
queries drawn, all its thumbnails decoded, the next page, and a re-sort by the per-query change. No model is needed:
the report's cost does not depend on which model ranked the pages. Not a test: correctness is in tests/test_report.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import time
from pathlib import Path

import torch

from vdr.data.schema import load_eval_set
from vdr.data.sources import load_table
from vdr.data.synth import SynthConfig, generate
from vdr.evaluation.metrics import retrieval_metrics
from vdr.evaluation.records import StageRecord
from vdr.evaluation.report import default_details, shown_rows, write_report

BROWSER = Path(__file__).resolve().parents[1] / "report_browser.py"


def _browser():
    spec = importlib.util.spec_from_file_location("report_browser", BROWSER)
    module = importlib.util.module_from_spec(spec)
    sys.modules["report_browser"] = module
    spec.loader.exec_module(module)
    return module


def random_stage(eval_set, seed: int, label: str) -> StageRecord:
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(len(eval_set.query_ids), len(eval_set.corpus_ids), generator=generator)  # [Q, N]
    top, rows = scores.topk(100)
    metrics = retrieval_metrics(rows, eval_set.qrels, corpus_size=len(eval_set.corpus_ids))
    return StageRecord.from_ranking(label, label, metrics, rows, top, eval_set.qrels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--distractors", type=int, default=9, help="corpus pages per query besides its positive")
    parser.add_argument("--image-size", type=int, default=512, help="page side in pixels")
    parser.add_argument("--thumbnail-size", type=int, default=160)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers making thumbnails")
    parser.add_argument("--work", type=Path, default=Path("/tmp/vdr-report-bench"))
    args = parser.parse_args()

    data = args.work / f"synth-{args.queries}-{args.distractors}-{args.image_size}"
    if not (data / "eval").exists():
        start = time.perf_counter()
        generate(data, SynthConfig(seed=0, image_size=args.image_size, num_train_pages=1, num_negatives=0,
                                   num_eval_queries=args.queries, distractors_per_query=args.distractors))
        print(f"generated {data} in {time.perf_counter() - start:.0f} s")
    eval_set = load_eval_set(str(data / "eval"), loader=load_table, verify_images=False)
    stages = [random_stage(eval_set, 0, "run A"), random_stage(eval_set, 1, "run B")]
    report = args.work / f"report-{args.queries}.html"
    start = time.perf_counter()
    write_report(report, eval_set, stages, title=f"benchmark: {args.queries} queries",
                 details=default_details("random", str(data), eval_set), compare=(0, 1),
                 thumbnail_size=args.thumbnail_size, num_workers=args.workers, progress=False)
    written = time.perf_counter() - start
    size = report.stat().st_size / 2**20
    shown = len(shown_rows(eval_set, stages))

    browser = _browser()
    with browser.open_report(report) as opened:
        page = opened.page
        first_drawn = page.evaluate("Number(document.body.dataset.firstDrawnMs)") / 1000
        total, loaded = opened.thumbnails()
        start = time.perf_counter()
        opened.rerendered(lambda: page.click("#pages-top button:has-text('next')"))
        page.wait_for_function(browser.ALL_DECODED)
        next_page = time.perf_counter() - start
        start = time.perf_counter()
        opened.rerendered(lambda: page.select_option("#sort", "delta-asc"))
        page.wait_for_function(browser.ALL_DECODED)
        resort = time.perf_counter() - start
        problems = list(opened.problems)
    print(f"machine: {platform.node()} ({platform.processor() or platform.machine()}), "
          f"{torch.get_num_threads()} threads; Chromium {browser.chromium_path()}")
    print("| queries | pages in corpus | thumbnails | file MB | KB per thumbnail | write s | first page drawn s | "
          "thumbnails decoded s | next page s | re-sort s |")
    print(f"| {len(eval_set.query_ids)} | {len(eval_set.corpus_ids)} | {shown} | {size:.1f} | "
          f"{size * 1024 / shown:.1f} | {written:.1f} | {first_drawn:.2f} | {opened.seconds:.2f} | {next_page:.2f} | "
          f"{resort:.2f} |")
    print(f"thumbnails on the first page: {loaded}/{total} loaded; problems: {problems or 'none'}")


if __name__ == "__main__":
    main()
