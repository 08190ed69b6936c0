"""Padding waste of training batches: fixed batch size in random order vs token-budget batching.

Generates synthetic pages whose side varies (``SynthConfig.page_size_range``) into a temporary directory (or reads
``--data``), builds one epoch of training loaders through ``RetrievalDataModule`` (fixed ``batch_size``, then
``max_tokens_per_batch`` at the fixed loader's largest batch, i.e. the same peak memory), collates every batch with the
real ``EmbeddingCollator`` (the tiny preset's processor) and counts real tokens (attention mask) against padded tokens
(the padded tensors), queries and pages together. Rows alone give the floor: the padding no batching removes.
Run: OMP_NUM_THREADS=2 python scripts/research/padding_waste.py  (30-60 s on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from vdr.data.collator import EmbeddingCollator
from vdr.data.datamodule import RetrievalDataModule
from vdr.data.synth import SynthConfig, generate
from vdr.models.backbone import load_backbone


def measure(loader) -> dict:
    """Real and padded decoder tokens of every batch of one epoch of ``loader``, and the padded tokens of each row
    alone (its query, and its pages padded to its largest page), from the same measured lengths."""
    padded, real, sizes, alone = [], [], [], 0
    for batch in loader:
        padded.append(batch.queries.input_ids.numel() + batch.documents.input_ids.numel())
        real.append(int(batch.queries.attention_mask.sum() + batch.documents.attention_mask.sum()))
        sizes.append(len(batch))
        pages = batch.documents.attention_mask.sum(1).view(-1, len(batch))  # [1 + k, B]: pages are column-major
        alone += int(batch.queries.attention_mask.sum()) + pages.shape[0] * int(pages.max(0).values.sum())
    return {"batches": len(sizes), "rows": sum(sizes), "sizes": sizes, "padded": padded, "real": real,
            "alone": alone}


def row(name: str, stats: dict) -> str:
    sizes, padded, real = stats["sizes"], stats["padded"], stats["real"]
    mean_size = sum(sizes) / len(sizes)
    return (f"| {name} | {stats['batches']} | {stats['rows']} | {mean_size:.1f} ({min(sizes)}-{max(sizes)}) "
            f"| {sum(real)} | {sum(padded)} | {sum(padded) / sum(real) - 1:.1%} | {max(padded)} "
            f"| {sum(padded) / len(padded):.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="a training table to read instead of generating synthetic pages")
    parser.add_argument("--rows", type=int, default=512, help="synthetic training rows")
    parser.add_argument("--page-size-range", type=int, nargs=2, default=(64, 256), help="synthetic page sides (px)")
    parser.add_argument("--num-negatives", type=int, default=1)
    parser.add_argument("--min-pixels", type=int, default=32 * 32)
    parser.add_argument("--max-pixels", type=int, default=256 * 256, help="caps a page at max_pixels / 32**2 tokens")
    parser.add_argument("--batch-size", type=int, default=32, help="the fixed batch (and the budgeted batches' cap)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    start = time.perf_counter()
    processor = load_backbone("tiny", min_pixels=args.min_pixels, max_pixels=args.max_pixels).processor
    collator = EmbeddingCollator(processor)

    with tempfile.TemporaryDirectory() as scratch:
        train = args.data
        if train is None:
            config = SynthConfig(seed=args.seed, num_train_pages=args.rows, num_negatives=args.num_negatives,
                                 num_eval_queries=2, distractors_per_query=0,
                                 page_size_range=tuple(args.page_size_range))
            generate(os.path.join(scratch, "synth"), config, progress=False)
            train = os.path.join(scratch, "synth", "train")

        def loader(max_tokens: int | None, batch_size: int = args.batch_size):
            data = RetrievalDataModule(train=train, num_negatives=args.num_negatives, batch_size=batch_size,
                                       seed=args.seed, max_tokens_per_batch=max_tokens)
            data.collator = collator
            data.setup("fit")
            return data.train_dataloader()

        results = [(f"fixed batch {args.batch_size}, random order", measure(loader(None)))]
        fixed = results[0][1]
        peak = max(fixed["padded"])
        for cap in (args.batch_size, 4 * args.batch_size):
            results.append((f"budget {peak} (fixed's peak), at most {cap} rows", measure(loader(peak, cap))))

    print(f"{fixed['rows']} rows x (query + {1 + args.num_negatives} pages); pages {args.page_size_range[0]}-"
          f"{args.page_size_range[1]} px, visual tokens capped at {args.max_pixels // 1024}; one epoch per loader\n")
    print("| loader | batches | rows | rows/batch mean (min-max) | real tokens | padded tokens "
          "| waste (padded/real - 1) | padded max/batch | padded mean/batch |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, stats in results:
        print(row(name, stats))
    # Batches of one row pad nothing across rows; a row's smaller pages still pad to its largest (one document tensor).
    print(f"| floor: each row alone (within-row padding only) | {fixed['rows']} | {fixed['rows']} | 1.0 (1-1) "
          f"| {sum(fixed['real'])} | {fixed['alone']} | {fixed['alone'] / sum(fixed['real']) - 1:.1%} | - | - |")
    print(f"\n{time.perf_counter() - start:.0f} s to generate the pages, collate every batch and count")


if __name__ == "__main__":
    main()
