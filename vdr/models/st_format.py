"""The Sentence Transformers directory formats (REFERENCE.md §4): a Qwen3-VL embedder (written and read) and a
Qwen3-VL reranker for ``CrossEncoder`` (written).

An embedder directory holds the Hugging Face backbone and processor at its root, plus four small JSON files that
tell ``SentenceTransformer(path)`` to run the backbone on chat-templated inputs, pool the last token and normalise.
Without ``modules.json`` a Qwen3-VL checkpoint silently loads with mean pooling and no normalisation; without
``sentence_bert_config.json`` it loads text-only. Both files are therefore always written and always checked.

Only JSON is handled here: weights and processor files are written by ``save_pretrained``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

TRANSFORMER_TYPE = "sentence_transformers.base.modules.transformer.Transformer"
POOLING_TYPE = "sentence_transformers.sentence_transformer.modules.pooling.Pooling"
NORMALIZE_TYPE = "sentence_transformers.base.modules.normalize.Normalize"
LOGIT_SCORE_TYPE = "sentence_transformers.cross_encoder.modules.logit_score.LogitScore"
# CrossEncoder activations by name: sigmoid gives the official probability, identity the raw log-odds.
ACTIVATIONS = {"sigmoid": "torch.nn.modules.activation.Sigmoid", "identity": "torch.nn.modules.linear.Identity"}

_FORWARD = {"method": "forward", "method_output_name": "last_hidden_state"}
# Every modality goes through the backbone's forward and yields token states; "message" inputs are chat turns with
# typed content parts ("structured"), which is how a prompt becomes the system turn and images precede text.
MODALITY_CONFIG = {
    "text": dict(_FORWARD),
    "image": dict(_FORWARD),
    "video": dict(_FORWARD),
    "message": {**_FORWARD, "format": "structured"},
}


def _dump(path: Path, value: dict | list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")


def write_embedder_config(
    directory: str | Path,
    *,
    embedding_dim: int,
    prompts: dict[str, str],
    truncate_dim: int | None = None,
) -> None:
    """Writes the Sentence Transformers files of a last-token, normalised Qwen3-VL embedder.

    Args:
        directory: Where the backbone and processor are (or will be) saved.
        embedding_dim: Hidden size of the backbone (the pooled dimension).
        prompts: ``{"query": ..., "document": ...}``: the system instructions used in training.
        truncate_dim: Default Matryoshka dimension for ``encode`` (first ``d`` dimensions), or None for all.
    """
    root = Path(directory)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": TRANSFORMER_TYPE},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": POOLING_TYPE},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": NORMALIZE_TYPE},
    ]
    _dump(root / "modules.json", modules)
    _dump(root / "sentence_bert_config.json", {
        "transformer_task": "feature-extraction",
        "modality_config": MODALITY_CONFIG,
        "module_output_name": "token_embeddings",
        # The generation prompt puts "<|im_start|>assistant\n" last: its newline is the pooled token (§3).
        "processing_kwargs": {"chat_template": {"add_generation_prompt": True}},
        # Qwen3-VL needs padded batches (image positions come from the padded layout).
        "unpad_inputs": False,
    })
    _dump(root / "1_Pooling" / "config.json",
          {"embedding_dimension": embedding_dim, "pooling_mode": "lasttoken", "include_prompt": True})
    _dump(root / "2_Normalize" / "config.json",
          {"module_input_name": "sentence_embedding", "module_output_name": "sentence_embedding"})
    config: dict = {
        "model_type": "SentenceTransformer",
        "prompts": {"query": prompts["query"], "document": prompts["document"]},
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
    }
    if truncate_dim is not None:
        config["truncate_dim"] = truncate_dim
    _dump(root / "config_sentence_transformers.json", config)


def write_cross_encoder_config(
    directory: str | Path,
    *,
    true_token_id: int,
    false_token_id: int,
    activation: str = "sigmoid",
) -> None:
    """Writes the Sentence Transformers files of a Qwen3-VL reranker scored by yes/no logits (``CrossEncoder``).

    The Transformer runs the causal model on chat-templated pairs and keeps the last position's logits
    (``logits_to_keep=1``, left padding); ``LogitScore`` turns them into ``logit[true] - logit[false]``.

    Args:
        directory: Where the model (with its LM head) and processor (with the reranker chat template) are saved.
        true_token_id: Token id of "yes".
        false_token_id: Token id of "no".
        activation: ``sigmoid`` (``predict`` returns the official probability) or ``identity`` (the log-odds).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    root = Path(directory)
    logits = {"method": "forward", "method_output_name": "logits"}
    _dump(root / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": TRANSFORMER_TYPE},
        {"idx": 1, "name": "1", "path": "1_LogitScore", "type": LOGIT_SCORE_TYPE},
    ])
    _dump(root / "sentence_bert_config.json", {
        "transformer_task": "any-to-any",
        "modality_config": {"text": dict(logits), "image": dict(logits), "video": dict(logits),
                            "message": {**logits, "format": "structured"}},
        "module_output_name": "causal_logits",
        # The score is read at the generation prompt's final "\n", as in training.
        "processing_kwargs": {"chat_template": {"add_generation_prompt": True}},
    })
    _dump(root / "1_LogitScore" / "config.json", {"true_token_id": true_token_id, "false_token_id": false_token_id,
                                                  "module_input_name": "causal_logits"})
    _dump(root / "config_sentence_transformers.json", {"model_type": "CrossEncoder",
                                                       "activation_fn": ACTIVATIONS[activation],
                                                       "prompts": {}, "default_prompt_name": None})


@dataclass(frozen=True)
class EmbedderLayout:
    """What a Sentence Transformers directory says about how its backbone is used.

    Attributes:
        transformer_path: Sub-directory of the Transformer module ("" for the root).
        pooling_mode: The Pooling module's mode, or None if the pipeline has no Pooling module.
        normalized: Whether a Normalize module follows the pooling.
        prompts: The named prompts of ``config_sentence_transformers.json`` (may be empty).
    """

    transformer_path: str
    pooling_mode: str | None
    normalized: bool
    prompts: dict[str, str]


def read_embedder_layout(files: dict[str, str | None], source: str) -> EmbedderLayout | None:
    """Parses a Sentence Transformers layout from its files.

    Args:
        files: Local paths of ``modules.json`` and of the other files it names (see :func:`layout_file_names`);
            a value is None when that file does not exist. No ``modules.json``: not a Sentence Transformers model.
        source: The directory or hub id, for error messages.

    Returns:
        The layout, or None when there is no ``modules.json``.
    """
    if files.get("modules.json") is None:
        return None
    modules = json.loads(Path(files["modules.json"]).read_text())
    by_kind: dict[str, dict] = {}
    for module in modules:
        kind = module["type"].rsplit(".", 1)[-1]
        by_kind.setdefault(kind, module)
    if "Transformer" not in by_kind:
        raise ValueError(f"{source}/modules.json has no Transformer module: {[m['type'] for m in modules]}")
    pooling_mode = None
    if "Pooling" in by_kind:
        pooling_file = files.get(os.path.join(by_kind["Pooling"]["path"], "config.json"))
        if pooling_file is None:
            raise ValueError(f"{source}: the Pooling module's {by_kind['Pooling']['path']}/config.json is missing")
        pooling = json.loads(Path(pooling_file).read_text())
        pooling_mode = pooling.get("pooling_mode") or next(
            (key[len("pooling_mode_"):].replace("_tokens", "") for key, on in pooling.items()
             if key.startswith("pooling_mode_") and on), None)  # older ST: one boolean per mode
    prompts = {}
    if files.get("config_sentence_transformers.json") is not None:
        prompts = json.loads(Path(files["config_sentence_transformers.json"]).read_text()).get("prompts") or {}
    return EmbedderLayout(by_kind["Transformer"]["path"], pooling_mode, "Normalize" in by_kind, prompts)


def layout_file_names(modules: list[dict] | None = None) -> list[str]:
    """The files :func:`read_embedder_layout` reads: ``modules.json`` first, then those it points to."""
    names = ["modules.json", "config_sentence_transformers.json"]
    for module in modules or []:
        if module["type"].endswith(".Pooling"):
            names.append(os.path.join(module["path"], "config.json"))
    return names


def check_last_token_embedder(layout: EmbedderLayout, source: str) -> None:
    """Refuses a Sentence Transformers model whose pooling is not what ``vdr`` trains (last token, normalised)."""
    if layout.pooling_mode != "lasttoken" or not layout.normalized:
        raise ValueError(
            f"{source} is a Sentence Transformers model with pooling {layout.pooling_mode!r} and "
            f"{'a' if layout.normalized else 'no'} Normalize module; vdr trains and serves last-token pooled, "
            "L2-normalised embeddings (REFERENCE.md §3), so training from it would change what its embeddings mean"
        )


def local_layout(directory: str | Path) -> EmbedderLayout | None:
    """:func:`read_embedder_layout` for a local directory."""
    root = Path(directory)

    def present(name: str) -> str | None:
        return str(root / name) if (root / name).is_file() else None

    if present("modules.json") is None:
        return None
    modules = json.loads((root / "modules.json").read_text())
    return read_embedder_layout({name: present(name) for name in layout_file_names(modules)}, str(root))


def embedder_layout(name_or_path: str) -> EmbedderLayout | None:
    """The layout of a local directory or, for anything else, of a hub repository (None: no ``modules.json``)."""
    return local_layout(name_or_path) if os.path.isdir(name_or_path) else hub_layout(name_or_path)


def hub_layout(repo_id: str) -> EmbedderLayout | None:
    """:func:`read_embedder_layout` for a hub repository (downloads only the small JSON files)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    def fetch(name: str) -> str | None:
        try:
            return hf_hub_download(repo_id, name)
        except EntryNotFoundError:  # also raised offline when the file is not cached
            return None

    modules_file = fetch("modules.json")
    if modules_file is None:
        return None
    modules = json.loads(Path(modules_file).read_text())
    files = {name: fetch(name) for name in layout_file_names(modules)[1:]}
    return read_embedder_layout({"modules.json": modules_file, **files}, repo_id)
