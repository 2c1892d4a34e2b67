"""Padding-free preference batches: every chosen and rejected sequence of a batch in one packed row.

trl 1.16 turns DPOConfig's `padding_free` off ("temporarily unavailable after a refactor"), so it is
done here, below trl's loss code: trl's collator still pads [2B, L] (cheap integer tensors), this one
adds where the real tokens are, and the decoder runs over those tokens only, as one row whose position
ids restart at each sequence. transformers then keeps sequences apart (flash-attention varlen on a
GPU, a block-diagonal mask under SDPA), but only with no attention mask and no KV cache, which trl's
fused head already turns off. The hidden states go back to their [2B, L] places (zeros at pads, which
carry no label), so trl's fused head and loss see exactly the padded layout.
"""
from __future__ import annotations

import types
from typing import Any

import torch


def packed_fields(attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Flat indices of the real tokens of a [rows, width] batch and each one's position in its sequence.

    Made by the collator on the host, so the model never asks the device where the tokens are."""
    real = attention_mask.bool()
    positions = attention_mask.long().cumsum(1) - 1
    return {"packed_index": real.reshape(-1).nonzero().squeeze(1), "packed_position_ids": positions[real]}


def packed_collator(base):
    """trl's DataCollatorForPreference, also saying where each batch's real tokens are."""

    class PackedPreferenceCollator(base):
        def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
            batch = super().torch_call(examples)
            batch.update(packed_fields(batch["attention_mask"]))
            return batch

    return PackedPreferenceCollator


def install_packed_backbone(model) -> None:
    """Make the decoder of `model` run padding-free when called with the collator's packed fields.

    Installed on the decoder (not the model's forward), below trl's fused head, which looks the decoder up
    on each call: a PEFT wrapper or FSDP applied later still reaches it. Called without packed fields
    (generation, saving), the decoder's own forward runs."""
    decoder = model.get_decoder()
    plain_forward = decoder.forward

    def forward(self, *args, packed_index=None, packed_position_ids=None, **inputs):
        if packed_index is None:
            return plain_forward(*args, **inputs)
        input_ids = inputs.pop("input_ids") if "input_ids" in inputs else args[0]
        inputs.pop("attention_mask", None)
        inputs.pop("position_ids", None)
        rows, width = input_ids.shape
        tokens = input_ids.reshape(-1).index_select(0, packed_index).unsqueeze(0)
        out = plain_forward(input_ids=tokens, position_ids=packed_position_ids.unsqueeze(0), **{**inputs, "use_cache": False})
        hidden = out.last_hidden_state[0]
        grid = hidden.new_zeros(rows * width, hidden.shape[-1]).index_copy(0, packed_index, hidden)
        out.last_hidden_state = grid.view(rows, width, hidden.shape[-1])
        return out

    decoder.forward = types.MethodType(forward, decoder)


def padding_fraction(pair_lengths: list[tuple[int, int]], batch_size: int) -> float:
    """Share of pad tokens when consecutive pairs are batched as trl does: the chosen and the rejected
    sequences of `batch_size` pairs (prompt included) in one batch, padded to the longest of them."""
    real = padded = 0
    for start in range(0, len(pair_lengths), batch_size):
        rows = [length for pair in pair_lengths[start:start + batch_size] for length in pair]
        real += sum(rows)
        padded += max(rows) * len(rows)
    return round(1 - real / padded, 4) if padded else 0.0
