"""transformers as the tests' independent reference: a checkpoint loaded with its family's own class, and
the per-token loss of conversations run through it one at a time.

    total, count = conversation_loss(hf_model(hf_dir), [(ids, mask), ...])
"""

from __future__ import annotations

from pathlib import Path


def hf_model(hf_dir: str | Path):
    """The checkpoint at `hf_dir` in its family's transformers class (fp32, eager attention, eval)."""
    import torch
    import transformers

    from models.registry import family_of, read_arch

    model_class = getattr(transformers, family_of(read_arch(hf_dir)).hf_model_class)
    return model_class.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()


def conversation_loss(model, conversations) -> tuple[float, int]:
    """(sum of token losses, loss tokens) of each (ids, mask) conversation run alone through `model`: the
    label of position t is token t + 1, trained where its mask is set."""
    import torch

    total, count = 0.0, 0
    for ids, mask in conversations:
        ids = torch.tensor(ids, dtype=torch.long)
        with torch.no_grad():
            logits = model(ids[None]).logits[0, :-1].double()
        losses = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="none")
        target = torch.tensor(mask[1:], dtype=torch.float64)
        total += float((losses * target).sum())
        count += int(target.sum())
    return total, count
