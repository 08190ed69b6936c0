"""Model cards of exports: what a reader of the directory needs to trust and reuse it."""

from __future__ import annotations

import datetime
import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vdr.evaluation.metrics import METRIC_NAMES

if TYPE_CHECKING:
    from vdr.export.weights import Provenance


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _block(value: dict[str, Any]) -> str:
    shown = {k: v for k, v in value.items() if not k.startswith("_")}  # drop Lightning's internal entries
    return "```json\n" + json.dumps(shown, indent=2, sort_keys=True, default=str) + "\n```"


def _write_card(directory: Path, *, pipeline_tag: str, tags: list[str], title: str, summary: str, usage: list[str],
                model: list[str], metric_names: tuple[str, ...], provenance: Provenance) -> None:
    """Writes ``directory/README.md`` from the parts both kinds of export share."""
    base = provenance.config.get("backbone", {}).get("name_or_path", "unknown")
    front = ["---", "library_name: sentence-transformers", f"pipeline_tag: {pipeline_tag}",
             f"tags: [sentence-transformers, {', '.join(tags)}, qwen3-vl, vdr]"]
    if "/" in base and not Path(base).exists():
        front.append(f"base_model: {base}")  # a hub id
    front.append("---")
    lines = [*front, "", f"# {title}", "", summary, "", "## Usage", "", "```python", *usage, "```", "", "## Model", "",
             f"- Base model: `{base}`", *model, "", "## Evaluation", ""]
    if provenance.metrics:
        when = f" (step {provenance.metrics_step})" if provenance.metrics_step is not None else ""
        lines += [f"Metrics on the eval set of the last validation before this checkpoint was saved{when}:", "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {provenance.metrics[name]:.4f} |" for name in metric_names if name in provenance.metrics]
    else:
        lines.append("No validation metrics were recorded with this checkpoint.")
    lines += ["", "## Training data", "", _block(provenance.data) if provenance.data else "Not recorded.", "",
              "## Training config", "", _block(provenance.config), "", "## Provenance", ""]
    if provenance.checkpoint:
        lines.append(f"- Checkpoint: `{provenance.checkpoint}` (step {provenance.step})")
    lines += [
        f"- Exported {datetime.date.today().isoformat()} with vdr {_version('vdr')}, torch {_version('torch')}, "
        f"transformers {_version('transformers')}, sentence-transformers {_version('sentence-transformers')}",
        "",
    ]
    (directory / "README.md").write_text("\n".join(lines))


def _page_size(module) -> str:
    size = module.processor.image_processor.size
    return (f"- Pages are resized to {size['shortest_edge']}..{size['longest_edge']} pixels (one visual token per "
            "32x32 pixels), as in training")


def write_embedder_card(directory: Path, *, name: str, module, prompts: dict[str, str], truncate_dim: int | None,
                        provenance: Provenance) -> None:
    """Writes the model card of a bi-encoder export: usage, base model, prompts, page size, data, config, metrics.

    Args:
        directory: Where to write (may be a staging directory).
        name: The export's final path, as a user would load it.
    """
    _write_card(
        directory, pipeline_tag="visual-document-retrieval", tags=["feature-extraction", "visual-document-retrieval"],
        title="Qwen3-VL page retriever (trained with vdr)",
        summary="A bi-encoder that embeds text queries and document page images into one space; rank pages by cosine.",
        usage=["from PIL import Image", "from sentence_transformers import SentenceTransformer", "",
               f'model = SentenceTransformer("{name}")',
               'queries = model.encode_query(["what was Acme revenue in 2019"])',
               'pages = model.encode_document([Image.open("page.png")])  # or {"image": ..., "text": ...}',
               "print(model.similarity(queries, pages))"],
        model=[f"- Embedding: last-token pooling, L2-normalised, {module.model.embedding_dim} dimensions"
               + (f" (encodes to the first {truncate_dim} by default: `truncate_dim`)" if truncate_dim else ""),
               _page_size(module),
               f"- Query prompt (system turn): `{prompts['query']}`",
               f"- Document prompt (system turn): `{prompts['document']}`"],
        metric_names=METRIC_NAMES, provenance=provenance,
    )


def write_reranker_card(directory: Path, *, name: str, module, activation: str, provenance: Provenance) -> None:
    """Writes the model card of a reranker export.

    Args:
        directory: Where to write (may be a staging directory).
        name: The export's final path, as a user would load it.
        activation: What ``predict`` returns by default (``sigmoid`` or ``identity``).
    """
    _write_card(
        directory, pipeline_tag="text-ranking", tags=["cross-encoder", "reranker", "visual-document-retrieval"],
        title="Qwen3-VL page reranker (trained with vdr)",
        summary="A cross-encoder that reads a text query and a document page image together and scores their "
                "relevance as the log-odds of answering \"yes\" over \"no\".",
        usage=["from PIL import Image", "from sentence_transformers import CrossEncoder", "",
               f'model = CrossEncoder("{name}")',
               'pages = [Image.open("a.png"), Image.open("b.png")]',
               'print(model.rank("what was Acme revenue in 2019", pages))'],
        model=["- Score: logit(\"yes\") - logit(\"no\") at the last token; `predict` applies "
               + ("a sigmoid (the official probability)" if activation == "sigmoid" else "no activation (log-odds)"),
               _page_size(module),
               f"- Instruction (`<Instruct>`): `{module.instruction}`"],
        metric_names=tuple(f"rerank_{m}" for m in METRIC_NAMES) + ("first_stage_ndcg@10",), provenance=provenance,
    )
