"""The batch format every training and evaluation step takes.

A batch is a dict {"inputs": int32 [B, T] token ids, "labels": int32 [B, T]}: labels[b, t] is
the token that should follow inputs[b, :t + 1], or IGNORE where no prediction is scored.
"""

IGNORE = -100  # label of positions without a target (PyTorch's cross-entropy convention).
