"""Fused classifier launcher (kernels/classifier.cu): softmax cross-entropy, loss and dlogits.

    fused_classifier(logits (N, Vp) floatX in/out, losses f32 (N,) =, targets int32 (N,), V, dloss)
    mean_loss(mean (1,) or () f32 =, losses (N,) f32)        the mean loss, one fixed-order block
    cross_entropy(logits, targets, V) -> losses                 logits untouched
    cross_entropy_grad(logits, targets, V, dloss=1/N) -> losses, dlogits   logits untouched

One block per row. The loss of each row is logsumexp(logits[:V]) - logits[target]; with
write_dlogits (training) the row is overwritten in place by dloss * (softmax - onehot(target))
for the V real columns and 0 for the padded columns V..Vp; without it (evaluation) the logits are
left untouched. No fp32 probabilities are ever stored.

dloss is the gradient of the reduced loss with respect to each row's loss, the same for every
row (for a mean over B*T tokens scaled by 1/grad_accum: 1 / (B*T*grad_accum)).

Targets are not range-checked on the host (that would need a device sync every step): a row
whose target is outside [0, V) gets a NaN loss, which shows in the mean loss, and dlogits
without the one-hot term.
"""
from __future__ import annotations

import numpy as np

from llmc import kernels
from llmc.ops import FLOATX, I32, F32, ceil_div, check, check_aligned, dtype_name
from llmc.ops.arrays import empty

BLOCK = 512  # threads per row: Vp = 50304 bf16 is 6288 16-byte chunks, ~12 per thread


def fused_classifier(logits, losses, targets, V: int, dloss: float, write_dlogits: bool = True):
    """Loss per row into losses (N,) f32; dlogits in place over logits (N, Vp) when write_dlogits."""
    check("logits", logits, (None, None), FLOATX)
    N, Vp = logits.shape
    check("losses", losses, (N,), F32)
    check("targets", targets, (N,), I32)
    V = int(V)
    if not 0 < V <= Vp:
        raise ValueError(f"V: expected 1 <= V <= Vp = {Vp}, got {V}")
    if (Vp * logits.itemsize) % 16 != 0:
        raise ValueError(f"logits: rows must be a multiple of 16 bytes for 128-bit access, got "
                         f"Vp = {Vp} of {logits.dtype} ({Vp * logits.itemsize} bytes)")
    check_aligned("logits", logits)
    if N == 0:
        return losses
    kernel = kernels.function("classifier", "fused_classifier", dtype_name(logits, "logits"))
    kernel((N,), (BLOCK,), (logits, losses, targets, np.float32(dloss), np.int32(V),
                            np.int32(Vp), np.int32(1 if write_dlogits else 0)))
    return losses


MEAN_BLOCK = 1024


def mean_loss(mean, losses):
    """mean (0-d or (1,) f32) = the mean of losses (N,) f32; one block, fixed order, no scratch."""
    check("losses", losses, (None,), F32)
    if mean.dtype != F32 or mean.size != 1:
        raise ValueError(f"mean: expected one float32 value (shape () or (1,)), got "
                         f"{mean.dtype} {tuple(mean.shape)}")
    N = losses.shape[0]
    if N == 0:
        raise ValueError("losses: expected at least one loss, got shape (0,)")
    kernel = kernels.function("classifier", "mean_loss", "fp32")
    kernel((1,), (MEAN_BLOCK,), (mean, losses, np.int32(N)))
    return mean


def classifier_bytes(N: int, V: int, Vp: int, itemsize: int, write_dlogits: bool = True) -> int:
    """DRAM bytes the kernel must move at least: logits read once, dlogits written, targets, losses."""
    read = N * ceil_div(V, 16 // itemsize) * 16
    written = N * Vp * itemsize if write_dlogits else 0
    return read + written + N * 4 * 2


# ---------------------------------------------------------------------------------------------
# functional forms: allocate their outputs


def cross_entropy(logits, targets, V: int):
    """Per-row softmax cross-entropy over the first V columns; losses (N,) f32, a new array.

    logits: (N, Vp) bf16 or fp32, Vp >= V, rows a multiple of 16 bytes (columns V..Vp are
    padding and ignored); targets: int32 (N,) in [0, V). logits are left untouched.
    """
    check("logits", logits, (None, None), FLOATX)
    return fused_classifier(logits, empty((logits.shape[0],), F32), targets, V, 0.0,
                            write_dlogits=False)


def cross_entropy_grad(logits, targets, V: int, dloss: float | None = None):
    """Losses and their gradient; returns (losses (N,) f32, dlogits (N, Vp)), new arrays.

    dlogits = dloss * (softmax(logits[:, :V]) - onehot(targets)), 0 in the padded columns;
    dloss is d(your loss)/d(each row's loss): 1/N (the default) for the mean over the N rows.
    logits are left untouched (a copy is overwritten; fused_classifier works in place).
    """
    check("logits", logits, (None, None), FLOATX)
    N = logits.shape[0]
    dlogits = empty(logits.shape, logits.dtype)
    dlogits.data.copy_from_device_async(logits.data, logits.nbytes)
    losses = fused_classifier(dlogits, empty((N,), F32), targets, V,
                              1.0 / max(N, 1) if dloss is None else dloss, write_dlogits=True)
    return losses, dlogits
