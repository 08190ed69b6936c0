"""Research loop for the reranker demo (outside Lightning): how fast does a from-scratch reranker leave ln(G)?

Same module, collator, data and loss as `vdr fit --config configs/rerank_demo.yaml`; prints the train loss every
10 steps and, at the end, rerank NDCG@10 on the first `--eval-queries` eval queries (20 sampled candidates each).
Starts from the backbone of configs/model/reranker-demo.yaml (the bi-encoder demo's export); the from-scratch runs of
docs/LOG.md used the `demo` preset with model/demo.yaml's backbone settings.
Run: OMP_NUM_THREADS=1 python scripts/research/rerank_loop.py --steps 200 --lr 1e-3 [--set key=value ...]
"""

from __future__ import annotations

import argparse
import time

import torch
import yaml

from vdr.data.schema import TrainRows, load_eval_set
from vdr.data.sources import load_table
from vdr.evaluation.candidates import sampled_candidates
from vdr.evaluation.run import rerank
from vdr.evaluation.scorers import ModuleScorer
from vdr.lit.base import BackboneConfig
from vdr.lit.reranker import RerankerModule
from vdr.losses import ranking

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=200)
parser.add_argument("--lr", type=float, default=1e-3)
parser.add_argument("--batch", type=int, default=16)
parser.add_argument("--batch-negatives", type=int, default=3)
parser.add_argument("--loss", default="ListwiseCE")
parser.add_argument("--temperature", type=float, default=None, help="for ListwiseCE / KLDistill")
parser.add_argument("--instruction", default=None)
parser.add_argument("--eval-queries", type=int, default=100)
parser.add_argument("--set", nargs="*", default=[], help="backbone overrides, e.g. initializer_range=0.05")
parser.add_argument("--unfreeze", action="store_true")
args = parser.parse_args()

config = yaml.safe_load(open("configs/model/reranker-demo.yaml"))["model"]["init_args"]
backbone = dict(config["backbone"])
for item in args.set:
    key, value = item.split("=")
    backbone[key] = type(backbone.get(key, 0.0) or 0.0)(value) if key in backbone else float(value)
kwargs = {"instruction": args.instruction} if args.instruction else {}
loss = getattr(ranking, args.loss)(**({"temperature": args.temperature} if args.temperature else {}))
torch.manual_seed(0)
module = RerankerModule(backbone=BackboneConfig(**backbone), max_text_tokens=64, batch_negatives=args.batch_negatives,
                        loss=loss, freeze_token_embeddings=not args.unfreeze, **kwargs)
rows = TrainRows(load_table("checkpoints/data/synth-128/train"), "train", num_negatives=0, verify_images=False)
loader = torch.utils.data.DataLoader(rows, batch_size=args.batch, shuffle=True, drop_last=True,
                                     collate_fn=module.collator, generator=torch.Generator().manual_seed(0))
params = [p for p in module.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
warmup = max(1, args.steps // 20)
schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * (
    0.5 * (1 + torch.cos(torch.tensor(torch.pi * max(0, s - warmup) / max(1, args.steps - warmup)))).item()))
module.train()
step, start, running = 0, time.perf_counter(), []
while step < args.steps:
    for batch in loader:
        scores = module.model(batch.inputs).view(batch.labels.shape)
        loss = module.loss(scores, batch.labels, mask=batch.mask, teacher=batch.teacher)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        running.append(loss.item())
        step += 1
        if step % 10 == 0:
            print(f"step {step} loss {sum(running) / len(running):.3f} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
            running = []
        if step >= args.steps:
            break
eval_set = load_eval_set("checkpoints/data/synth-128/eval", loader=load_table, verify_images=False)
candidates = sampled_candidates(eval_set, 20)
candidates.rows = candidates.rows[: args.eval_queries]
eval_set.qrels = eval_set.qrels[: args.eval_queries]
module.eval()
scores = rerank(ModuleScorer(module.model, module.collator), candidates, eval_set, batch_size=100, progress=False)
reranked = candidates.metrics(eval_set, candidates.reranked(scores))["ndcg@10"]
print(f"first stage {candidates.metrics(eval_set)['ndcg@10']:.3f} rerank {reranked:.3f} "
      f"({time.perf_counter() - start:.0f} s)")
