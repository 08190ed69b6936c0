"""The cross-encoder reranker: Qwen3-VL reads the query and the page together and answers "yes" or "no".

The score is the log-odds ``logit("yes") - logit("no")`` at the last token (REFERENCE.md §3), which equals
``(W_yes - W_no) . h_last`` for the LM head ``W``. Only those two rows of the head are ever applied, and only to the
last hidden state: the ``[B, L, vocab]`` logits a plain forward would build (151,936 columns per token) are never
materialised.
"""

from __future__ import annotations

import torch
from torch import nn

from vdr.models.backbone import trunk_hidden_states
from vdr.models.inputs import EncoderInputs
from vdr.models.lora import unwrap
from vdr.models.pooling import last_token_index


def yes_no_token_ids(tokenizer) -> tuple[int, int]:
    """The ids of "yes" and "no" (Qwen: 9693 and 2152), read from the tokenizer rather than assumed."""
    return tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")


class Reranker(nn.Module):
    """A ``Qwen3VLForConditionalGeneration`` scored by its yes/no logits at the last token.

    Args:
        backbone: The Qwen3-VL with its LM head, or a peft model around one.
        yes_token_id: Token whose logit means relevant (Qwen: "yes" = 9693).
        no_token_id: Token whose logit means not relevant (Qwen: "no" = 2152).
    """

    def __init__(self, backbone: nn.Module, yes_token_id: int, no_token_id: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.yes_token_id, self.no_token_id = yes_token_id, no_token_id

    @property
    def trunk(self) -> nn.Module:
        """The ``Qwen3VLModel`` under the LM head (vision tower + decoder)."""
        return unwrap(self.backbone).model

    def last_hidden(self, inputs: EncoderInputs) -> torch.Tensor:
        """``[B, D]`` final hidden state (after the last norm) of each sequence's last attended token."""
        hidden = trunk_hidden_states(self.trunk, inputs)  # [B, L, D]
        index = last_token_index(inputs.attention_mask)  # [B]
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]  # [B, D]

    def yes_no_logits(self, inputs: EncoderInputs) -> torch.Tensor:
        """``[B, 2]`` LM-head logits of "yes" and "no" at the last token, in float32."""
        head = unwrap(self.backbone).lm_head
        rows = head.weight[[self.yes_token_id, self.no_token_id]]  # [2, D]
        bias = head.bias
        logits = self.last_hidden(inputs).float() @ rows.float().T  # [B, 2]
        if bias is not None:
            logits = logits + bias[[self.yes_token_id, self.no_token_id]].float()
        return logits

    def forward(self, inputs: EncoderInputs) -> torch.Tensor:
        """``[B]`` relevance scores as log-odds (``sigmoid`` gives the official probability)."""
        logits = self.yes_no_logits(inputs)  # [B, 2]
        return logits[:, 0] - logits[:, 1]
