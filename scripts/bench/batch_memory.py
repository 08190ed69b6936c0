"""Peak memory and step time against batch size: plain InfoNCE steps vs GradCache, through the real training loop.

Each setting runs ``BiEncoderModule`` under Lightning's ``Trainer.fit`` for a warmup step plus ``--steps`` timed steps
on synthetic pages (one hard negative per query), and prints one row: samples/s, median step time and peak memory.
A setting is ``MODE:BATCH[:MINI_BATCH][:FLAG...]``: ``plain:16``, ``cached:64:8:gc`` (GradCache in mini-batches of 8
sequences, gradient checkpointing in both towers). Flags: ``gc`` (checkpointing), ``off`` (activation offloading),
``tN`` (GradCache mini-batches of at most N tokens; ``cached:64:-:t2800`` bounds them by tokens alone), ``vN`` (with
``gc``: each vision block checkpointed over tiles of N images, ``vdr.models.checkpoint_tiles``), ``rN`` (with
``gc``: each decoder layer checkpointed over tiles of N rows), ``sparse`` (sparse
token-embedding gradients, ``vdr.models.sparse_embedding``), ``dev`` or
``proc`` (pages become patches on the device or in the workers; default ``--page-preprocessing``), ``prof`` (one
more step under torch.profiler: the ops that cost most host time, the GPU's busy fraction and the synchronisations),
``nohost`` (the model derives rope positions and vision segments itself, reading GPU tensors back to the host),
``mem`` (GPU: one more step under torch's memory history; prints what was allocated at its peak, grouped by the code
that allocated it; with ``--snapshots DIR`` also writes the snapshot there for https://pytorch.org/memory_viz).

CPU, tiny preset (each setting in a fresh process; memory = a training step's peak resident memory above its start):
    python scripts/bench/batch_memory.py --preset tiny --settings plain:8 plain:32 cached:32:8 cached:128:8
GPU, the 2b layout with random weights, bf16 weights, 600x600 pages (memory = torch.cuda peak allocated):
    python scripts/bench/batch_memory.py --preset 2b --device cuda --dtype bfloat16 --page 600 --max-pixels 360000 \
        --settings plain:16:gc cached:64:8:gc cached:256:32:gc --reference bench_out/results.jsonl
``--reference`` reads the reference trainer's results (``shared/bench-reference``, run in the same session) and
prints each of our settings' throughput and memory as ratios of its rows.

Every row also reports the fraction of wall time the loop waited for data (from the end of one step to the start of
the next: fetching the batch from the DataLoader workers and moving it to the device); ``--page-preprocessing``
chooses where pages become patches (``device``: at the forward, ``processor``: in the workers).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass

import lightning as L
import torch
from PIL import Image, ImageDraw

from vdr.data.collator import EmbeddingCollator
from vdr.data.schema import TrainExample
from vdr.lit.biencoder import BackboneConfig, BiEncoderModule
from vdr.models.backbone import set_gradient_checkpointing
from vdr.models.offload import OffloadActivations
from vdr.models.sparse_embedding import sparse_embedding_gradients

# Events the mem flag's CUDA trace keeps; a full ring buffer drops the step's first events (flagged when it happens).
MEMORY_TRACE_EVENTS = 3_000_000
WORDS = "revenue profit margin cash flow assets equity debt growth forecast segment quarter annual report".split()


@dataclass
class Setting:
    mode: str  # plain or cached
    batch: int
    mini_batch: int | None
    checkpointing: bool
    tokens: int | None = None
    offload: bool = False
    pages: str | None = None  # device or processor; None: --page-preprocessing
    profile: bool = False
    memory: bool = False  # mem: one more step under the CUDA memory history
    host_metadata: bool = True  # the collator's host-side rope positions and vision segments (nohost: the model's)
    vision_images: int | None = None  # vN: vision-block checkpoints over tiles of N images
    text_rows: int | None = None  # rN: decoder-layer checkpoints over tiles of N rows
    sparse_embedding: bool = False  # sparse: the token table's gradient added row by row

    @classmethod
    def parse(cls, text: str) -> Setting:
        mode, *rest = text.split(":")
        if mode not in ("plain", "cached") or not rest or not rest[0].isdigit():
            raise argparse.ArgumentTypeError(f"{text!r}: expected plain:BATCH[:FLAG...] or cached:BATCH:MINI[:FLAG...]")
        setting = cls(mode, int(rest[0]), None, False)
        flags = rest[1:]
        if mode == "cached":
            if not flags or not (flags[0].isdigit() or flags[0] == "-"):
                raise argparse.ArgumentTypeError(f"{text!r}: cached needs a mini-batch size (or - with a tN flag)")
            setting.mini_batch = None if flags[0] == "-" else int(flags[0])
            flags = flags[1:]
        for flag in flags:
            if flag == "gc":
                setting.checkpointing = True
            elif flag == "off":
                setting.offload = True
            elif flag == "prof":
                setting.profile = True
            elif flag == "mem":
                setting.memory = True
            elif flag == "nohost":
                setting.host_metadata = False
            elif flag[:1] == "r" and flag[1:].isdigit() and int(flag[1:]) > 0:
                setting.text_rows = int(flag[1:])
            elif flag == "sparse":
                setting.sparse_embedding = True
            elif flag in ("dev", "proc"):
                setting.pages = {"dev": "device", "proc": "processor"}[flag]
            elif flag[:1] == "t" and flag[1:].isdigit() and mode == "cached":
                setting.tokens = int(flag[1:])
            elif flag[:1] == "v" and flag[1:].isdigit() and int(flag[1:]) > 0:
                setting.vision_images = int(flag[1:])
            else:
                raise argparse.ArgumentTypeError(f"{text!r}: unknown flag {flag!r} (gc, off, tN, vN, rN, sparse, "
                                                 "dev, proc, prof, mem, nohost)")
        if (setting.vision_images or setting.text_rows) and not setting.checkpointing:
            raise argparse.ArgumentTypeError(f"{text!r}: vN and rN tile the checkpoints: add gc")
        if mode == "cached" and setting.mini_batch is None and setting.tokens is None:
            raise argparse.ArgumentTypeError(f"{text!r}: GradCache needs a mini-batch size or a token budget")
        return setting

    def __str__(self) -> str:
        parts = [self.mode, str(self.batch)]
        if self.mode == "cached":
            parts.append(str(self.mini_batch) if self.mini_batch else "-")
        parts += [f"t{self.tokens}"] if self.tokens else []
        parts += [f"v{self.vision_images}"] if self.vision_images else []
        parts += [f"r{self.text_rows}"] if self.text_rows else []
        flags = (("gc", self.checkpointing), ("off", self.offload), ("sparse", self.sparse_embedding),
                 ("nohost", not self.host_metadata), ("prof", self.profile), ("mem", self.memory))
        parts += [flag for flag, on in flags if on]
        parts += [{"device": "dev", "processor": "proc"}[self.pages]] if self.pages else []
        return ":".join(parts)


class Pages(torch.utils.data.Dataset):
    """Synthetic rows: a short query, a positive and one hard-negative page (a title, text lines and a bar chart)."""

    def __init__(self, rows: int, side: int) -> None:
        self.rows, self.side = rows, side

    def __len__(self) -> int:
        return self.rows

    def page(self, seed: int) -> Image.Image:
        image = Image.new("RGB", (self.side, self.side), "white")
        draw = ImageDraw.Draw(image)
        for line in range(2, self.side // 24):
            draw.text((16, line * 20), " ".join(WORDS[(seed + line + i) % len(WORDS)] for i in range(8)), fill="black")
        for bar in range(6):
            height = (seed * 7 + bar * 13) % (self.side // 3)
            draw.rectangle([self.side // 2 + bar * 20, self.side - 20 - height, self.side // 2 + bar * 20 + 14,
                            self.side - 20], fill=(40 * bar, 90, 160))
        return image

    def __getitem__(self, row: int) -> TrainExample:
        query = f"what was the {WORDS[row % len(WORDS)]} of company {row} in {2000 + row % 20}"
        return TrainExample(row, query, [self.page(2 * row), self.page(2 * row + 1)], [2 * row, 2 * row + 1])


class StepTimer(L.Callback):
    """Step times; on the CPU also each step's peak resident memory above its start (the batch already loaded)."""

    def __init__(self, profile_step: int | None = None, memory_step: int | None = None) -> None:
        self.profile_step, self.profiler = profile_step, None
        self.memory_step, self.memory_snapshot = memory_step, None
        self.times: list[float] = []
        self.waits: list[float] = []  # end of the previous step to the start of this one: the data wait
        self.growth: list[float] = []
        self.end: float | None = None

    def _sync(self, module) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(pl_module)
        if batch_idx == self.memory_step:
            # Stacks for allocations only: a free's stack is not needed to replay the trace.
            torch.cuda.memory._record_memory_history(context="alloc", stacks="python", max_entries=MEMORY_TRACE_EVENTS)
            return
        if batch_idx == self.profile_step:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if pl_module.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
            self.start = time.perf_counter()
            return
        if pl_module.device.type == "cpu":
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # resets the peak resident set size (VmHWM) to the current one
            self.rss = rss_gib()
        self.start = time.perf_counter()
        if self.end is not None:
            self.waits.append(self.start - self.end)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(pl_module)
        if batch_idx == self.memory_step:
            self.memory_snapshot = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            return
        if batch_idx == self.profile_step:
            self.profiled_s = time.perf_counter() - self.start
            self.profiler.__exit__(None, None, None)
            return
        self.end = time.perf_counter()
        self.times.append(self.end - self.start)
        if pl_module.device.type == "cpu":
            with open("/proc/self/status") as handle:
                peak = next(int(line.split()[1]) for line in handle if line.startswith("VmHWM"))
            self.growth.append(peak / 2**20 - self.rss)


class WithoutHostMetadata:
    """A collator whose batches leave the rope positions and vision segments to the model (the A/B of ``nohost``)."""

    def __init__(self, collator: EmbeddingCollator) -> None:
        self.collator = collator

    def __call__(self, examples):
        batch = self.collator(examples)
        for side in (batch.queries, batch.documents):
            side.position_ids = side.vision_seqlens = None
        return batch


def rss_gib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def build(args) -> BiEncoderModule:
    backbone = BackboneConfig(args.preset, min_pixels=args.min_pixels, max_pixels=args.max_pixels, dtype=args.dtype,
                              attn_implementation=args.attn)
    fused = args.device == "cuda"  # one fused AdamW kernel: no foreach temporaries the size of the weights

    def optimizer(params):
        return torch.optim.AdamW(params, lr=2e-5, weight_decay=0.01, fused=fused)

    with torch.device(args.device):  # random init on the GPU: seconds instead of a minute for the 2b layout
        return BiEncoderModule(backbone, optimizer=optimizer, warmup_ratio=0.0, decay="constant",
                               page_preprocessing=args.page_preprocessing)


def profile_summary(timer: StepTimer, setting: Setting, args) -> dict:
    """The profiled step: top host-time ops (printed and written next to --out), GPU busy time, synchronisations."""
    events = timer.profiler.key_averages()
    table = events.table(sort_by="self_cpu_time_total", row_limit=20)
    print(f"\n== profile of {setting} (one step, {timer.profiled_s:.2f} s under the profiler)\n{table}", flush=True)
    if args.out:
        with open(f"{os.path.splitext(args.out)[0]}-profile-{str(setting).replace(':', '_')}.txt", "w") as handle:
            handle.write(table)

    def device_us(event) -> float:
        return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)

    counts = {e.key: e.count for e in events}
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]  # not the ops launching them
    return {"profiled_step_s": round(timer.profiled_s, 3),
            "gpu_busy_frac": round(sum(device_us(e) for e in kernels) / 1e6 / timer.profiled_s, 3),
            "syncs": {k: counts[k] for k in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::item",
                                              "aten::_local_scalar_dense", "cudaMemcpyAsync") if k in counts}}


def run(module: BiEncoderModule, setting: Setting, args) -> dict:
    module.mini_batch_size = setting.mini_batch
    module.mini_batch_tokens = setting.tokens
    module.offload = OffloadActivations() if setting.offload else None
    pages = setting.pages or args.page_preprocessing
    module.collator = EmbeddingCollator(module.processor, module.prompts, module.hparams.max_text_tokens, pages)
    if not setting.host_metadata:
        module.collator = WithoutHostMetadata(module.collator)
    set_gradient_checkpointing(module.trunk, text=setting.checkpointing, vision=setting.checkpointing,
                               vision_images=setting.vision_images, text_rows=setting.text_rows)
    sparse_embedding_gradients(module.trunk.get_input_embeddings(), setting.sparse_embedding)
    steps = 1 + args.steps  # the first step allocates optimizer state and warms kernels up: not timed
    memory = setting.memory and args.device == "cuda"
    timer = StepTimer(profile_step=steps if setting.profile else None,
                      memory_step=steps + setting.profile if memory else None)
    steps += setting.profile + memory
    data = torch.utils.data.DataLoader(Pages(setting.batch * steps, args.page), batch_size=setting.batch,
                                       collate_fn=module.collator, num_workers=args.workers,
                                       pin_memory=args.device == "cuda",
                                       persistent_workers=False, prefetch_factor=4 if args.workers else None)
    precision = "bf16-mixed" if args.device == "cuda" else "32-true"
    trainer = L.Trainer(accelerator=args.device, devices=1, max_steps=steps, precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[timer], limit_val_batches=0, num_sanity_val_steps=0)
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    before = rss_gib()
    started = time.perf_counter()
    trainer.fit(module, train_dataloaders=data)
    wall = time.perf_counter() - started
    timed = timer.times[1:] or timer.times
    median = statistics.median(timed)
    record = {"setting": str(setting), **vars(setting), "preset": args.preset, "device": args.device,
              "page": args.page, "step_s": round(median, 3), "samples_per_s": round(setting.batch / median, 3),
              "first_step_s": round(timer.times[0], 2), "steps_timed": len(timed), "wall_s": round(wall, 1),
              "page_preprocessing": pages, "workers": args.workers,
              "data_wait_s": round(statistics.median(timer.waits), 3) if timer.waits else None,
              "data_wait_frac": round(sum(timer.waits) / (sum(timer.waits) + sum(timed)), 3) if timer.waits else None}
    if setting.profile:
        record.update(profile_summary(timer, setting, args))
    if timer.memory_snapshot is not None:
        record["peak_composition"] = memory_summary(timer.memory_snapshot, setting, args)
    if setting.offload:
        record["offloaded_gib_per_step"] = round(module.offload.bytes / 2**30 / steps, 2)
    if args.device == "cuda":
        record["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        record["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        record["gpu"] = torch.cuda.get_device_name()
    else:
        record["peak_rss_growth_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 - before, 3)
        record["step_peak_gib"] = round(statistics.median(timer.growth[1:] or timer.growth), 3)
    del trainer
    module.zero_grad(set_to_none=True)
    return record


def peak_composition(snapshot: dict, top: int = 15) -> tuple[int, list[tuple[str, int, int]]]:
    """What was allocated during a recorded step at its peak: ``(peak bytes above the step's start, [(code, bytes,
    allocations), ...])``, largest first.

    Replays the device's allocation trace (``torch.cuda.memory._snapshot()["device_traces"][0]``): an ``alloc`` adds
    its block, a ``free_completed`` (or, in a trace without those, a ``free_requested``) removes it. Blocks are grouped
    by the innermost Python frame in vdr, transformers or lightning code (else the innermost frame): a backward's
    allocations carry the frame that called ``backward``.
    """
    trace = snapshot["device_traces"][0] if snapshot.get("device_traces") else []
    free = "free_completed" if any(e["action"] == "free_completed" for e in trace) else "free_requested"

    def replay(stop: int) -> tuple[dict[int, dict], int, int]:
        """Blocks live after the first ``stop`` events; the peak over them and the event that reached it."""
        live: dict[int, dict] = {}
        total = peak = peak_at = 0
        for i, event in enumerate(trace[:stop]):
            if event["action"] == "alloc":
                live[event["addr"]] = event
                total += event["size"]
                if total > peak:
                    peak, peak_at = total, i + 1
            elif event["action"] == free and event["addr"] in live:
                total -= live.pop(event["addr"])["size"]
        return live, peak, peak_at

    _, peak, peak_at = replay(len(trace))
    at_peak = list(replay(peak_at)[0].values())  # a second pass: copying the live set at every new peak is quadratic
    groups: dict[str, list[int]] = {}
    for event in at_peak:
        frames = event.get("frames") or []
        ours = [f for f in frames if any(k in f["filename"] for k in ("/vdr/", "/transformers/", "/lightning/"))]
        frame = (ours or frames or [None])[0]
        code = f"{frame['filename'].rsplit('/site-packages/', 1)[-1]}:{frame['line']} {frame['name']}" if frame \
            else "(no frame)"
        group = groups.setdefault(code, [0, 0])
        group[0] += event["size"]
        group[1] += 1
    ranked = sorted(((code, size, count) for code, (size, count) in groups.items()), key=lambda g: -g[1])
    return peak, ranked[:top]


def memory_summary(snapshot: dict, setting: Setting, args) -> list:
    """Prints the recorded step's peak composition (and writes the snapshot next to --out); the rows, for the record."""
    peak, groups = peak_composition(snapshot)
    events = len(snapshot["device_traces"][0]) if snapshot.get("device_traces") else 0
    print(f"\n== {setting}: {peak / 2**30:.2f} GiB allocated at the recorded step's peak above its start "
          f"({events} events)", flush=True)
    if events >= MEMORY_TRACE_EVENTS:
        print(f"  WARNING: the trace is full ({MEMORY_TRACE_EVENTS} events): the step's first events were dropped, so "
              "the peak and its composition may miss what was allocated before them", flush=True)
    for code, size, count in groups:
        print(f"  {size / 2**20:9.1f} MiB  {count:5d}x  {code}")
    if args.snapshots:  # hundreds of MB for a 2B step: not next to --out, which a GPU call copies back
        import pickle

        os.makedirs(args.snapshots, exist_ok=True)
        with open(os.path.join(args.snapshots, f"memory-{str(setting).replace(':', '_')}.pickle"), "wb") as handle:
            pickle.dump(snapshot, handle)
    return [[code, round(size / 2**20, 1), count] for code, size, count in groups]


def reference_rows(path: str) -> list[dict]:
    rows = []
    with open(path) as handle:
        for line in handle:
            record = json.loads(line)
            if record.get("samples_per_s"):
                rows.append(record)
    return rows


def report(records: list[dict], reference: list[dict]) -> None:
    memory = "peak_gib" if records and "peak_gib" in records[0] else "step_peak_gib"
    width = max([36, *(len(r["setting"]) for r in records)])
    print(f"\n{'setting':<{width}} {'samples/s':>10} {'step s':>8} {'first s':>8} {memory:>20} {'data wait':>10}")
    for r in records:
        wait = r.get("data_wait_frac")
        print(f"{r['setting']:<{width}} {r['samples_per_s']:>10.2f} {r['step_s']:>8.3f} {r['first_step_s']:>8.1f} "
              f"{r.get(memory, float('nan')):>20.2f} {'-' if wait is None else f'{wait:.1%}':>10}")
    for ref in reference:
        name = f"reference {ref['mode']} batch {ref.get('batch_size')}"
        print(f"\n{name}: {ref['samples_per_s']:.2f} samples/s, peak {ref.get('peak_mem_gib')} GiB")
        for r in records:
            ratio = r["samples_per_s"] / ref["samples_per_s"]
            mem = r.get("peak_gib", float("nan")) / ref["peak_mem_gib"] if ref.get("peak_mem_gib") else float("nan")
            print(f"  {r['setting']:<{width}} {ratio:6.2f}x the samples/s, {mem:5.2f}x the peak memory")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--page", type=int, default=64, help="page side in pixels")
    parser.add_argument("--min-pixels", type=int, default=28 * 28)
    parser.add_argument("--max-pixels", type=int, default=64 * 64)
    parser.add_argument("--settings", type=Setting.parse, nargs="+", required=True)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per setting (after one warmup step)")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--page-preprocessing", default="device", choices=["device", "processor"])
    parser.add_argument("--out", help="append one JSON line per setting here")
    parser.add_argument("--reference", help="the reference trainer's results.jsonl, for side-by-side ratios")
    parser.add_argument("--snapshots", help="write each mem setting's CUDA memory snapshot (a pickle) in this folder")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one CPU setting, in a subprocess
    args = parser.parse_args()
    torch.manual_seed(0)
    records = []
    if args.device == "cpu" and not args.child and len(args.settings) > 1:
        # Peak RSS only grows: each setting gets a process of its own.
        for setting in args.settings:
            argv = [a for a in sys.argv[1:]]
            index = argv.index("--settings")
            end = next((i for i in range(index + 1, len(argv)) if argv[i].startswith("--")), len(argv))
            argv[index + 1 : end] = [str(setting)]
            # Large blocks from mmap, returned to the system when freed: resident memory then follows live tensors.
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            output = subprocess.run([sys.executable, __file__, *argv, "--child"], capture_output=True, text=True,
                                    check=True, env=env).stdout
            records.append(json.loads(output.strip().splitlines()[-1].removeprefix("RECORD ")))
    else:
        module = build(args)
        print(f"built {args.preset}: {sum(p.numel() for p in module.parameters()) / 1e6:.1f}M parameters",
              file=sys.stderr, flush=True)
        for setting in args.settings:
            try:
                record = run(module, setting, args)
            except torch.OutOfMemoryError:
                record = {"setting": str(setting), "error": "out of memory"}
                torch.cuda.empty_cache()
            except Exception as error:  # one failing setting must not cost the others (GPU time is scarce)
                traceback.print_exc()
                record = {"setting": str(setting), "error": f"{type(error).__name__}: {error}"[:300]}
                module.zero_grad(set_to_none=True)
                if args.device == "cuda":
                    torch.cuda.empty_cache()
            records.append(record)
            print("RECORD " + json.dumps(record), flush=True)
            if args.out:
                with open(args.out, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
        if args.child:
            return
    ok = [r for r in records if "error" not in r]
    for r in records:
        if "error" in r:
            print(f"{r['setting']}: {r['error']}")
    report(ok, reference_rows(args.reference) if args.reference else [])


if __name__ == "__main__":
    main()
