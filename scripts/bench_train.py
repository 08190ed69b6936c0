"""Bi-encoder training throughput: our Lightning step against a bare PyTorch loop over the same model and batches.

Builds ``BiEncoderModule`` at a size preset (random weights, one seed) and the same pre-collated batches of synthetic
pages (one query, its page and ``--negatives`` hard-negative pages per row, every page distinct), then trains on them
twice, each mode in a fresh process so that its peak memory is its own:
- ``lightning``: ``Trainer.fit`` with the module's own ``training_step``, optimizer, clipping and precision plugin;
- ``bare``: ``for batch in batches: loss = ...; loss.backward(); clip; opt.step()`` on the same module's model and
  loss, with the same optimizer, clipping and precision done by hand.
Warm-up steps are excluded; per mode it prints samples/s (batch / median step), the median, min and max step time,
peak memory, model FLOPs per step and MFU, then the ratio lightning / bare and the first-step losses of both modes
(equal maths gives equal losses). With ``--preset 2b --device cuda`` it also prints the issue's anchor and targets.

CPU, tiny preset (about a minute):
    python scripts/bench_train.py --preset tiny --steps 20 --warmup 3
GPU, the Qwen3-VL-2B layout with random weights, the anchor's workload (768x1024 px pages = 24x32 = 768 visual tokens):
    python scripts/bench_train.py --preset 2b --device cuda --batch 16 --negatives 1 --page 768x1024 \
        --precision bf16-mixed --gradient-checkpointing --output bench_out/train.jsonl
(``--page 896`` gives 28x28 = 784 visual tokens on square pages.) Where ``vdr`` is not installed (the benchmark
machines), run from the repository root with ``PYTHONPATH=.``; ``--output`` appends one JSON row per mode.

Precision: ``--dtype`` is the dtype the weights are built in (and the optimizer state follows); ``--precision`` is
Lightning's plugin, mirrored by hand in the bare loop: ``32-true`` computes in the weights' dtype; ``bf16-mixed``
runs the forward and loss under bf16 autocast (with ``--dtype float32``: fp32 master weights, what
``configs/trainer/gpu.yaml`` trains with); ``bf16-true`` casts the module to bf16 and makes bf16 the default dtype
during the forward. The reference trainer's "bf16 weights" run is ``--dtype bfloat16 --precision bf16-mixed``.

What the ratio holds: our ``training_step`` also checks the loss for NaN (one host sync per step) and logs, which
the bare loop does not; that is part of the Lightning overhead measured here. Against the reference trainer's anchor
the script compares wall samples/s, but our batches are pre-collated and already rendered, while the reference's
timing includes its collation and copy: a real-data comparison belongs to ``scripts/bench/batch_memory.py``.

Step time runs from Lightning's batch-start hook to its batch-end hook (the GPU synchronised at both): forward, loss,
backward, clipping and optimizer step, but not moving the batch to the device, which Lightning does before the hook
(the bare loop moves it before its clock starts too). ``wall samples/s`` counts everything between the first timed
step's start and the last one's end, loop overhead between steps included. Memory: on CUDA the peak allocated
during training (weights included); on the CPU the peak resident memory above the start of training (gradients,
optimizer state and activations; weights and batches were allocated before).

Model FLOPs per step (:func:`step_flops`) count the matmuls the model needs, not what the kernels execute: a weight
matrix of ``m x n`` costs ``2mn`` FLOPs per token forward and ``4mn`` backward (input and weight gradients), so
``6 x matmul weights x tokens``: decoder layers x real text tokens (visual placeholders included, padding not),
patch embedding and vision blocks x patches, patch mergers x visual tokens; attention scores and values are
counted apart. Gradient-checkpointing recompute, embedding look-ups, norms and the loss are not counted. MFU divides
the dense FLOPs by the median step time and ``--peak-tflops`` (the reference trainer's convention); ``MFU+attn``
adds the attention FLOPs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

# The parent process only launches one process per mode and prints their rows: torch, Lightning and vdr are imported
# inside the functions a measuring process runs (about ten seconds saved per run on a small CPU).

MODES = ("lightning", "bare")
PEAK_TFLOPS_CUDA = 989.0  # H100 / H200 SXM, dense bf16 (the reference trainer's figure)
# The issue's anchor, measured on an H200 (shared/bench-reference/NOTE.md): 2b layout, batch 16, one hard negative,
# 768 visual tokens per page, gradient checkpointing, sdpa.
ANCHOR = {"trainer_samples_per_s": 6.1, "trainer_bf16_weights_samples_per_s": 6.5,
          "trainer_bf16_weights_peak_gib": 28.0, "trainer_mfu": 0.17, "bare_fp32_master_samples_per_s": 6.0}


# ---------------------------------------------------------------------------------------------------------- FLOPs


@dataclass(frozen=True)
class FlopModel:
    """What the FLOP count needs to know of a ``Qwen3VLModel``: its matmul weights per tower and attention shapes."""

    text_matmul: int  # weight-matrix entries of the decoder layers: every text token passes them once
    vision_matmul: int  # patch embedding + vision blocks: every patch passes them once
    merger_matmul: int  # patch merger + DeepStack mergers: every visual token (merge_area patches) passes them once
    merge_area: int
    text_layers: int
    text_attention_width: int  # query heads x head_dim (grouped K/V heads still score every query head)
    vision_layers: int
    vision_width: int

    @classmethod
    def of(cls, trunk) -> FlopModel:
        """Counts the weight matrices (parameters of two or more dimensions; biases and norms are not matmuls)."""
        text, vision, visual = trunk.config.text_config, trunk.config.vision_config, trunk.visual
        return cls(
            text_matmul=_matrix_entries(trunk.language_model.layers),
            vision_matmul=_matrix_entries(visual.patch_embed) + _matrix_entries(visual.blocks),
            merger_matmul=_matrix_entries(visual.merger) + _matrix_entries(visual.deepstack_merger_list),
            merge_area=vision.spatial_merge_size**2,
            text_layers=text.num_hidden_layers,
            text_attention_width=text.num_attention_heads * text.head_dim,
            vision_layers=vision.depth,
            vision_width=vision.hidden_size,
        )


def _matrix_entries(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.dim() >= 2)


@dataclass
class Tokens:
    """What one step's model processed, counted from its batch."""

    text: int = 0  # real tokens over all sequences, visual placeholders included, padding excluded
    text_squares: int = 0  # sum over sequences of length^2 (attention)
    patches: int = 0  # vision-tower tokens, before the 2x2 merge
    patch_squares: int = 0  # sum over images of patches^2 (the vision tower attends within each image)

    @classmethod
    def of(cls, *sides) -> Tokens:
        """Counts ``EncoderInputs`` (a training batch: its queries and its documents)."""
        tokens = cls()
        for side in sides:
            lengths = side.attention_mask.sum(1).tolist()
            tokens.text += sum(lengths)
            tokens.text_squares += sum(n * n for n in lengths)
            if side.image_grid_thw is not None:
                patches = side.image_grid_thw.prod(-1).tolist()
                tokens.patches += sum(patches)
                tokens.patch_squares += sum(p * p for p in patches)
        return tokens


def step_flops(model: FlopModel, tokens: Tokens) -> dict[str, float]:
    """Model FLOPs of one training step (forward + backward), ``{"dense": ..., "attention": ...}``.

    dense = 6 x (text_matmul x text tokens + vision_matmul x patches + merger_matmul x patches / merge_area).
    Attention per layer and sequence of length L, with width w = heads x head_dim: scores and weighted values are
    2 L^2 w FLOPs each forward; the text is causal (half of them), the vision tower bidirectional within an image;
    backward is twice the forward. Text: 3 x 2 L^2 w = 6 w L^2 per layer; vision: 3 x 4 p^2 w = 12 w p^2 per image.
    """
    dense = 6.0 * (model.text_matmul * tokens.text + model.vision_matmul * tokens.patches
                   + model.merger_matmul * tokens.patches / model.merge_area)
    attention = (6.0 * model.text_layers * model.text_attention_width * tokens.text_squares
                 + 12.0 * model.vision_layers * model.vision_width * tokens.patch_squares)
    return {"dense": dense, "attention": attention}


# ------------------------------------------------------------------------------------------------ pages, batches


def page_size(text: str) -> tuple[int, int]:
    """``"896"`` -> (896, 896); ``"768x1024"`` -> (768, 1024): width x height in pixels."""
    width, _, height = text.lower().partition("x")
    try:
        return int(width), int(height or width)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SIDE or WIDTHxHEIGHT in pixels") from None


def make_batches(collator, args) -> list:
    """``warmup + steps`` pre-collated ``RetrievalBatch`` es of distinct synthetic pages (deterministic)."""
    import random

    from vdr.data.schema import TrainExample
    from vdr.data.synth import COMPANIES, METRICS, YEARS, render_page

    width, height = args.page
    columns = 1 + args.negatives

    def page(seed: int):
        rng = random.Random(seed)
        topic = (rng.choice(COMPANIES), rng.choice(METRICS), rng.choice(YEARS))
        image = render_page(*topic, rng, size=max(width, height))
        return image if width == height else image.resize((width, height))

    batches = []
    for step in range(args.warmup + args.steps):
        examples = []
        for row in range(step * args.batch, (step + 1) * args.batch):
            rng = random.Random(-1 - row)
            query = f"what was {rng.choice(COMPANIES)} {rng.choice(METRICS).lower()} in {rng.choice(YEARS)}"
            keys = [columns * row + c for c in range(columns)]
            examples.append(TrainExample(row, query, [page(k) for k in keys], keys))
        batches.append(collator(examples))
    return batches


def fingerprint(batches: list) -> str:
    """A hash of every token id, mask and page byte: both modes' processes must report the same one."""
    digest = hashlib.blake2b(digest_size=8)
    for batch in batches:
        for side in (batch.queries, batch.documents):
            for tensor in (side.input_ids, side.attention_mask, side.image_grid_thw, side.pixel_values,
                           side.pages.pixels if side.pages is not None else None):
                if tensor is not None:
                    digest.update(tensor.contiguous().view(-1).numpy().tobytes())
        digest.update(batch.document_keys.numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------- measuring


class Clock:
    """Step times between ``start`` and ``stop`` (``sync`` waits for the device at both ends) and each step's loss."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.losses: list[float] = []

    def start(self) -> None:
        self.sync()
        self.starts.append(time.perf_counter())

    def stop(self, loss) -> None:
        self.sync()
        self.ends.append(time.perf_counter())
        self.losses.append(loss.detach().item())  # read after the clock stopped: no synchronisation inside the step


def build(args):
    """The module at ``--preset`` with random weights from ``--seed``, on ``--device``."""
    import torch

    from vdr.lit.biencoder import BackboneConfig, BiEncoderModule

    width, height = args.page
    backbone = BackboneConfig(args.preset, min_pixels=args.min_pixels, max_pixels=args.max_pixels or width * height,
                              dtype=args.dtype, attn_implementation=args.attn, seed=args.seed)
    # The recipe's optimizer; fused on the GPU (one kernel, no foreach temporaries the size of the weights).
    optimizer = functools.partial(torch.optim.AdamW, lr=2e-5, weight_decay=0.01,
                                  fused=True if args.device == "cuda" else None)
    with torch.device(args.device):  # random init on the GPU: seconds instead of a minute for the 2b layout
        return BiEncoderModule(backbone, optimizer=optimizer, warmup_ratio=0.0, decay="constant",
                               gradient_checkpointing_text=args.gradient_checkpointing,
                               gradient_checkpointing_vision=args.gradient_checkpointing)


def run_lightning(module, batches: list, args, clock: Clock) -> None:
    import logging
    import warnings

    import lightning as L
    import torch

    class Timed(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            clock.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            clock.stop(outputs["loss"])

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    for noise in (".*does not have many workers.*", ".*no `val_dataloader`.*", ".*LeafSpec.*"):
        warnings.filterwarnings("ignore", message=noise)
    data = torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=_unchanged)
    trainer = L.Trainer(accelerator=args.device, devices=1, max_steps=len(batches), precision=args.precision,
                        gradient_clip_val=args.clip, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Timed()],
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=data)


def _unchanged(batch):
    return batch  # the batches are collated already


def run_bare(module, batches: list, args, clock: Clock) -> None:
    from dataclasses import replace

    import torch

    device = torch.device(args.device)
    precision = contextlib.nullcontext  # a fresh context around every step's forward and loss
    if args.precision == "bf16-mixed":
        precision = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)
    elif args.precision == "bf16-true":
        module.to(torch.bfloat16)  # what Lightning's plugin does to the module at setup
        precision = functools.partial(_default_dtype, torch.bfloat16)  # and around every forward
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = module.optimizer_factory(params)
    # The Lightning run's schedule is constant too (warmup_ratio 0, decay constant); stepped for equal overhead.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    for batch in batches:
        batch = replace(batch, queries=batch.queries.to(device), documents=batch.documents.to(device),
                        document_keys=batch.document_keys.to(device))
        clock.start()
        with precision():
            queries = module.model(batch.queries)  # [B, D]
            documents = module.model(batch.documents)  # [B * (1 + k), D]
            loss = module.loss(queries, documents, document_keys=batch.document_keys)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip:
            torch.nn.utils.clip_grad_norm_(params, args.clip)
        optimizer.step()
        schedule.step()
        clock.stop(loss)


@contextlib.contextmanager
def _default_dtype(dtype):
    import torch

    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(field + ":"))


def measure(args, mode: str) -> dict:
    """Builds the module and batches, trains ``mode`` on them and returns its row."""
    import lightning
    import torch
    import transformers

    module = build(args)
    batches = make_batches(module.collator, args)
    flop_model = FlopModel.of(module.trunk)
    timed_flops = [step_flops(flop_model, Tokens.of(b.queries, b.documents)) for b in batches[args.warmup :]]
    cuda = args.device == "cuda"
    documents = batches[0].documents
    row = {"mode": mode, "preset": args.preset, "device": args.device,
           "gpu": torch.cuda.get_device_name() if cuda else None, "precision": args.precision, "dtype": args.dtype,
           "gradient_checkpointing": args.gradient_checkpointing, "attn": args.attn, "batch": args.batch,
           "negatives": args.negatives, "page_px": list(args.page),
           "visual_tokens_per_page": int(documents.image_grid_thw[0].prod()) // flop_model.merge_area,
           "document_tokens": int(documents.attention_mask[0].sum()), "warmup": args.warmup, "steps": args.steps,
           "parameters": sum(p.numel() for p in module.parameters()), "batches_hash": fingerprint(batches),
           "torch": torch.__version__, "lightning": lightning.__version__, "transformers": transformers.__version__}
    clock = Clock(torch.cuda.synchronize if cuda else lambda: None)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets the peak resident set size (VmHWM) to the current one
        start_kib = _status_kib("VmRSS")
    try:
        (run_lightning if mode == "lightning" else run_bare)(module, batches, args, clock)
    except torch.OutOfMemoryError:
        return {**row, "error": "out of memory"}
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if cuda else (_status_kib("VmHWM") - start_kib) / 2**20
    times = [end - start for start, end in zip(clock.starts, clock.ends)][args.warmup :]
    median = statistics.median(times)
    dense = statistics.mean(f["dense"] for f in timed_flops)
    attention = statistics.mean(f["attention"] for f in timed_flops)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else None
    return {**row, "samples_per_s": args.batch / median,
            "wall_samples_per_s": args.batch * len(times) / (clock.ends[-1] - clock.starts[args.warmup]),
            "step_s_median": median, "step_s_min": min(times), "step_s_max": max(times),
            "first_step_s": clock.ends[0] - clock.starts[0], "peak_mem_gib": peak_gib,
            "peak_mem_kind": "cuda max allocated" if cuda else "resident growth during training",
            "flops_per_step": dense, "attention_flops_per_step": attention,
            "achieved_tflops": dense / median / 1e12, "peak_tflops": args.peak_tflops,
            "mfu": dense / median / peak if peak else None,
            "mfu_with_attention": (dense + attention) / median / peak if peak else None,
            "first_loss": clock.losses[0], "last_loss": clock.losses[-1]}


# ------------------------------------------------------------------------------------------------------ report


def spawn(mode: str, argv: list[str]) -> dict:
    """Runs one mode in a fresh process (its peak memory is then its own) and returns its row."""
    # (No MALLOC_MMAP_THRESHOLD_ here, unlike scripts/bench/batch_memory.py: mmap for every block of 64 KiB made the
    # tiny preset's CPU steps 15x slower, and the peak resident size is measured from training's start anyway.)
    done = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--child", mode],
                          stdout=subprocess.PIPE, text=True)
    rows = [line.removeprefix("ROW ") for line in done.stdout.splitlines() if line.startswith("ROW ")]
    if done.returncode != 0 or not rows:
        sys.stdout.write(done.stdout[-4000:])
        raise SystemExit(f"the {mode} run failed (exit code {done.returncode})")
    return json.loads(rows[-1])


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def report(rows: list[dict], compare: dict | None) -> None:
    first = next((r for r in rows if "error" not in r), None)
    if first is None:
        print("\n".join(f"{r['mode']}: {r['error']}" for r in rows))
        return
    print(f"\n{first['preset']} on {first['gpu'] or 'cpu'}, batch {first['batch']} + {first['negatives']} hard "
          f"negative(s), {first['visual_tokens_per_page']} visual tokens per page ({first['document_tokens']} tokens "
          f"per page sequence), {first['precision']}, {first['dtype']} weights, gradient checkpointing "
          f"{'on' if first['gradient_checkpointing'] else 'off'}; median of {first['steps']} steps after "
          f"{first['warmup']} warm-up")
    print(f"{'mode':<10} {'samples/s':>9} {'wall s/s':>9} {'step med s':>10} {'min..max s':>14} {'peak GiB':>9} "
          f"{'TFLOP/step':>10} {'MFU':>6} {'MFU+attn':>8} {'first loss':>11}")
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:<10} {r['error']}")
            continue
        print(f"{r['mode']:<10} {r['samples_per_s']:>9.3f} {r['wall_samples_per_s']:>9.3f} {r['step_s_median']:>10.4f} "
              f"{r['step_s_min']:>6.4f}..{r['step_s_max']:<6.4f} {r['peak_mem_gib']:>9.3f} "
              f"{r['flops_per_step'] / 1e12:>10.4f} {_pct(r['mfu']):>6} {_pct(r['mfu_with_attention']):>8} "
              f"{r['first_loss']:>11.6f}")
    print(f"(peak memory: {first['peak_mem_kind']}; MFU against {first['peak_tflops'] or 'no'} peak TFLOP/s)")
    if compare:
        print(f"lightning / bare: {compare['samples_per_s']:.3f}x samples/s ({compare['wall_samples_per_s']:.3f}x "
              f"wall), {compare['peak_mem'] or float('nan'):.3f}x peak memory; first-step loss difference "
              f"{compare['first_loss_diff']:.2e}; same batches: {'yes' if compare['same_batches'] else 'NO'}")
    ours = next((r for r in rows if r["mode"] == "lightning" and "error" not in r), None)
    if ours and ours["preset"] == "2b" and ours["device"] == "cuda":
        a = ANCHOR
        print(f"\nanchor (H200, reference Sentence Transformers trainer, same workload): {a['trainer_samples_per_s']} "
              f"samples/s ({a['trainer_bf16_weights_samples_per_s']} with bf16 weights, "
              f"{a['trainer_bf16_weights_peak_gib']:.0f} GiB peak), about {_pct(a['trainer_mfu'])} MFU; bare loop with "
              f"fp32 master weights {a['bare_fp32_master_samples_per_s']} samples/s"
              + ("" if "H200" in (ours["gpu"] or "") else f"  [this run: {ours['gpu']}, not an H200]"))
        checks = [
            # Wall samples/s (loop overhead between steps included) against the reference's mean step: its timing
            # also holds collation and the host-to-device copy, which our pre-collated batches do not, so treat a
            # narrow "met" with care and confirm with a real-data run (scripts/bench/batch_memory.py).
            ("samples/s >= 2x the reference trainer", ours["wall_samples_per_s"] / a["trainer_samples_per_s"], 2.0),
            ("peak memory <= the reference's 28 GiB", a["trainer_bf16_weights_peak_gib"] / ours["peak_mem_gib"], 1.0),
            ("MFU >= 40%", (ours["mfu"] or 0.0) / 0.40, 1.0),
        ]
        if compare:
            checks.append(("lightning within 10% of the bare loop", compare["samples_per_s"] / 0.9, 1.0))
        speedup = ours["wall_samples_per_s"] / a["trainer_samples_per_s"]
        print(f"ours: {ours['wall_samples_per_s']:.2f} samples/s (wall) = {speedup:.2f}x the reference trainer, "
              f"{ours['peak_mem_gib']:.1f} GiB peak, {_pct(ours['mfu'])} MFU")
        for name, value, needed in checks:
            print(f"  {'met ' if value >= needed else 'MISS'} {name}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=["tiny", "demo", "2b"], help="model size (random weights)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=16, help="queries per step")
    parser.add_argument("--negatives", type=int, default=1, help="hard-negative pages per query")
    parser.add_argument("--page", type=page_size, default=(128, 128), help="page size: SIDE or WIDTHxHEIGHT pixels")
    parser.add_argument("--min-pixels", type=int, default=28 * 28, help="smallest page area after resizing")
    parser.add_argument("--max-pixels", type=int, help="largest page area after resizing (default: the page's area)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=3, help="steps before them, not timed")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weight dtype at build")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "bf16-true"],
                        help="Lightning's precision plugin (mirrored by hand in the bare loop)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute text and vision layers")
    parser.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, flash_attention_2)")
    parser.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping (configs/trainer/default.yaml)")
    parser.add_argument("--peak-tflops", type=float, help=f"device peak for MFU (CUDA default {PEAK_TFLOPS_CUDA:.0f}, "
                        "bf16 dense H100/H200; CPU: none, MFU n/a)")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--output", help="append one JSON row per mode to this file")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)  # measure one mode in this process
    args = parser.parse_args(argv)
    if args.warmup < 0 or args.steps < 1:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.peak_tflops is None and args.device == "cuda":
        args.peak_tflops = PEAK_TFLOPS_CUDA
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        print("ROW " + json.dumps(measure(args, args.child)), flush=True)
        return
    rows = [spawn(mode, argv) for mode in args.modes]
    by_mode = {r["mode"]: r for r in rows if "error" not in r}
    compare = None
    if {"lightning", "bare"} <= by_mode.keys():
        ours, bare = by_mode["lightning"], by_mode["bare"]
        compare = {"samples_per_s": ours["samples_per_s"] / bare["samples_per_s"],
                   "wall_samples_per_s": ours["wall_samples_per_s"] / bare["wall_samples_per_s"],
                   "peak_mem": ours["peak_mem_gib"] / bare["peak_mem_gib"] if bare["peak_mem_gib"] > 0 else None,
                   "first_loss_diff": abs(ours["first_loss"] - bare["first_loss"]),
                   "same_batches": ours["batches_hash"] == bare["batches_hash"]}
    report(rows, compare)
    if args.output:
        os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
        run = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        with open(args.output, "a") as handle:
            for r in rows:
                handle.write(json.dumps({"run": run, **r, "lightning_over_bare": compare}) + "\n")


if __name__ == "__main__":
    main()
