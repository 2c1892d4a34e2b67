"""The distillation loss over hidden states and the output head, with its gradient made in the forward.

kd/losses.py's `distill_loss` builds each [chunk, V] logits block in forward and, under activation
checkpointing, again in backward: two head matmuls forward and two in backward per chunk. Here each
chunk's logits are made once: the forward computes the chunk's loss and, right away, its gradients
with respect to the chunk's hidden states and the head's weight, then frees the block. The backward
only scales those stored gradients by the incoming one. Three head matmuls instead of four, no
[chunk, V] tensor alive past its chunk, and the loss parts stay on the device (no host sync).

The loss itself is `kd/losses.py`'s (`_chunk_sums`, every loss kind, given the chunk's logits), so
value and gradient are the same functions; autograd runs only through its elementwise part, and the
head's two backward matmuls write into the gradient buffers in place. Tests compare them with the
checkpointed path and with float64 references. The price
is a buffer the size of the head's weight, held from forward to backward (what Liger's fused linear
losses hold too). Used for a bias-free head with gradients wanted; otherwise the checkpointed path.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from posttrain.kd.losses import _chunk_sums, distill_loss


class _HeadWithGradInForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, ids, values, labels, tail, settings: dict[str, Any]):
        alpha, chunk_size, denominator = settings["alpha"], settings["chunk_size"], settings["denominator"]
        with_ce = alpha < 1
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        kd_total = hidden.new_zeros((), dtype=torch.float32)
        ce_total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_size):
            part = slice(start, start + chunk_size)
            chunk = hidden[part]
            logits = F.linear(chunk, weight)  # under autocast, in its dtype, as the model's own head would
            with torch.enable_grad():
                # Autograd only through the loss's elementwise part: the gradient of the chunk's logits.
                leaf = logits.detach().requires_grad_(True)
                kd, ce = _chunk_sums(leaf, lambda z: z, ids[part], values[part],
                                     tail[part] if tail is not None else None, labels[part],
                                     settings["loss"], settings["temperature"], with_ce)
                (grad_logits,) = torch.autograd.grad((alpha * kd + (1 - alpha) * ce) / denominator, leaf)
            del logits, leaf
            # The head's two backward matmuls, written into the buffers: no [V, H] temporary per chunk.
            if grad_hidden is not None:
                grad_hidden[part] = (grad_logits @ weight.to(grad_logits.dtype)).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t().to(weight.dtype), chunk.to(weight.dtype))
            kd_total = kd_total + kd.detach()
            ce_total = ce_total + ce.detach()
            del grad_logits, kd, ce  # before the next chunk's block is made, not after
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight) if g is not None))
        ctx.has = (grad_hidden is not None, grad_weight is not None)
        total = (alpha * kd_total + (1 - alpha) * ce_total) / denominator
        ctx.mark_non_differentiable(kd_total, ce_total)
        return total, kd_total, ce_total

    @staticmethod
    def backward(ctx, grad_total, _grad_kd, _grad_ce):
        saved = list(ctx.saved_tensors)
        # Scaled in place: the buffers are this call's own and used once, so no second head-sized copy.
        grad_hidden = saved.pop(0).mul_(grad_total) if ctx.has[0] else None
        grad_weight = saved.pop(0).mul_(grad_total) if ctx.has[1] else None
        return grad_hidden, grad_weight, None, None, None, None, None


def fused_distill_loss(hidden: torch.Tensor, head: torch.nn.Module, ids: torch.Tensor, teacher_logp: torch.Tensor,
                       labels: torch.Tensor, alpha: float = 1.0, loss: str = "forward_kl", temperature: float = 1.0,
                       chunk_size: int = 1024, teacher_tail: torch.Tensor | None = None,
                       normalizer: float | torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """`distill_loss`'s value and gradient, each [chunk, V] block made once; loss parts as device scalars."""
    weight = getattr(head, "weight", None)
    grad_wanted = torch.is_grad_enabled() and (hidden.requires_grad or (weight is not None and weight.requires_grad))
    if not grad_wanted or not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return distill_loss(hidden, head, ids, teacher_logp, labels, alpha=alpha, loss=loss, temperature=temperature,
                            chunk_size=chunk_size, teacher_tail=teacher_tail, normalizer=normalizer)
    n = hidden.shape[0]
    # Half chunks of what the checkpointed path would make (at most chunk_size, at most n): making a
    # chunk's gradient in the forward holds ~1.2x the checkpointed path's bytes per logit (measured on
    # the CPU at V = 128256), so at half the positions the fused peak stays under the checkpointed one.
    half = max(1, (min(chunk_size, n) + 1) // 2)
    settings = {"alpha": alpha, "loss": loss, "temperature": temperature, "chunk_size": half,
                "denominator": normalizer if normalizer is not None else max(n, 1)}
    total, kd_total, ce_total = _HeadWithGradInForward.apply(hidden, weight, ids, teacher_logp, labels,
                                                             teacher_tail, settings)
    parts = {"kd_loss": kd_total / max(n, 1)}
    if alpha < 1:
        parts["ce_loss"] = ce_total / max(n, 1)
    return total, parts
