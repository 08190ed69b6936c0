"""Reranker export: a ``vdr fit`` reranker checkpoint becomes a directory that ``CrossEncoder(path)`` serves as is.

The directory (REFERENCE.md §4) holds the Qwen3-VL with its LM head (safetensors + config.json), the processor with
the training page-size bounds and the reranker chat template (rendering the ``query`` and ``document`` roles exactly
as the collator does, with the training instruction), the Sentence Transformers pipeline files (Transformer
any-to-any -> LogitScore over the "yes" and "no" token ids) and a model card.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

from vdr.export.atomic import atomic_directory, check_destination
from vdr.export.card import write_reranker_card
from vdr.export.weights import Provenance, check_dtype, merged_backbone, save_weights
from vdr.models.st_format import write_cross_encoder_config


def export_reranker(
    module,
    output: str | os.PathLike,
    *,
    overwrite: bool = False,
    dtype: str | None = None,
    activation: str = "sigmoid",
    provenance: Provenance | None = None,
    in_place: bool = False,
) -> Path:
    """Writes a trained reranker as a Sentence Transformers ``CrossEncoder`` directory.

    Args:
        module: A ``RerankerModule``.
        output: The directory to create; replaced only if ``overwrite`` and only once the export is complete.
        overwrite: Replace an existing non-empty ``output``.
        dtype: Weight dtype of the export (``float32``, ``bfloat16``, ``float16``); default: as trained.
        activation: What ``CrossEncoder.predict`` applies by default: ``sigmoid`` (the official probability) or
            ``identity`` (the log-odds the module computes).
        provenance: Checkpoint, data, config and metrics for the model card.
        in_place: The caller will not use ``module`` again (adapters may be merged into it).

    Returns:
        The output directory.
    """
    check_destination(output, overwrite)
    check_dtype(dtype)
    backbone = merged_backbone(module.model.backbone, in_place=in_place)
    # The processor is shared with the module: give the export a copy that carries the reranker template.
    processor = copy.copy(module.processor)
    processor.tokenizer = copy.copy(module.processor.tokenizer)
    processor.chat_template = processor.tokenizer.chat_template = module.collator.chat_template
    with atomic_directory(output, overwrite) as staging:
        save_weights(backbone, staging, dtype)
        processor.save_pretrained(staging)
        write_cross_encoder_config(staging, true_token_id=module.model.yes_token_id,
                                   false_token_id=module.model.no_token_id, activation=activation)
        write_reranker_card(staging, name=str(output), module=module, activation=activation,
                            provenance=provenance or Provenance(config=dict(module.hparams)))
    return Path(output)
