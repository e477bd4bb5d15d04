"""A language-model head and its cross-entropy in one pass, a chunk of rows at a time.

``F.cross_entropy(hidden @ W.T + b, targets)`` materialises the logits [N, V], runs a
log-softmax over them, then in backward a second pass over them (the log-softmax
gradient), a zero-filled [N, V] for the NLL gradient and the two matmuls. Here each chunk
of rows computes its logits, their log-sum-exp, and at once the gradient of the summed
loss with respect to them (softmax - one-hot, written over the logits in place), then
the gradients of the hidden states, W and b. Backward only scales them by the incoming
gradient. A chunk's logits stay small (256 rows, or about 1 M logits on a CPU at a small
vocabulary; 128 M on a GPU), and the full [N, V] never exists. On 2 CPU cores (N = 4,064
rows, H = 256, forward and backward) it took 116 ms where F.cross_entropy over the linear
head took 155 at V = 4,096, 540 against 748 at V = 20,573, and 1,820 against 1,885 at
V = 50,257. The idea of Liger-Kernel's fused linear cross-entropy.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def chunk_rows(vocab: int, device: torch.device) -> int:
    """Rows per chunk: about 1 M logits on a CPU (its caches), 128 M on a GPU (memory),
    and never fewer than 256 rows (a matmul of fewer rows runs far below the peak)."""
    budget = 2 ** 27 if device.type == "cuda" else 2 ** 20
    return max(256, budget // max(vocab, 1))


def matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's products run in: autocast's where it is on for the device,
    else that of the inputs."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunked(hidden, weight, bias, targets, rows: int, count_correct: bool,
             grads: tuple[bool, bool, bool]):
    """(loss sum, correct count, gradients of the loss sum for hidden, weight, bias: None
    where not wanted), one chunk of ``rows`` rows at a time."""
    # hidden [N, H], weight [V, H], bias [V] or None, targets [N] (IGNORE_INDEX: none)
    dtype = matmul_dtype(hidden, weight)
    low_precision = dtype != torch.float32
    with torch.autocast(hidden.device.type, enabled=False):  # the casts below are autocast's
        # cast once, where autocast would cast the weight again for every chunk's product
        # (a [V, H] copy each: 9 ms at GPT-2's size on 2 CPU cores)
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        return _chunks(hidden, w, b, targets, rows, count_correct, grads, low_precision)


def _chunks(hidden, w, b, targets, rows, count_correct, grads, low_precision):
    """``_chunked`` with the weight ``w`` and bias ``b`` already in the products' dtype."""
    n, width = hidden.shape
    vocab = w.shape[0]
    device = hidden.device
    grad_hidden = torch.empty(n, width, device=device, dtype=hidden.dtype) if grads[0] else None
    grad_weight = torch.zeros(vocab, width, device=device, dtype=torch.float32) \
        if grads[1] else None
    grad_bias = (torch.zeros(vocab, device=device, dtype=torch.float32)
                 if b is not None and grads[2] else None)
    loss = torch.zeros((), device=device, dtype=torch.float32)
    correct = torch.zeros((), device=device, dtype=torch.long)
    # buffers reused by every chunk: a fresh CPU tensor of this size is page-faulted in
    # each time (a [V, H] bf16 -> fp32 conversion took 14 ms fresh, 1.6 into a buffer)
    span = min(rows, n)
    logits32 = torch.empty(span, vocab, device=device) if low_precision else None
    low_buf = (torch.empty(span, vocab, device=device, dtype=w.dtype)
               if low_precision and any(grads) else None)
    product = (torch.empty(vocab, width, device=device, dtype=w.dtype)
               if low_precision and grad_weight is not None else None)
    # on a CPU, adding the bf16 product to fp32 makes a fresh fp32 copy first; a GPU
    # casts it on the fly
    product32 = (torch.empty_like(grad_weight)
                 if product is not None and device.type == "cpu" else None)
    for start in range(0, n, rows):
        h, t = hidden[start:start + rows].to(w.dtype), targets[start:start + rows]
        logits = h @ w.t()  # [n, V], in the products' dtype
        if b is not None:
            logits += b
        if low_precision:  # the softmax and its gradient in fp32
            logits = logits32[:len(t)].copy_(logits)
        valid = t != IGNORE_INDEX
        safe = t.masked_fill(~valid, 0)
        if count_correct:  # a pass over the logits: at evaluation only
            correct += ((logits.argmax(-1) == t) & valid).sum()
        lse = torch.logsumexp(logits, -1)  # [n]
        picked = logits.gather(1, safe[:, None]).squeeze(1)
        loss += ((lse - picked) * valid).sum()
        if grad_hidden is None and grad_weight is None and grad_bias is None:
            continue
        # d(sum of losses)/d logits = softmax - one-hot, zero on ignored rows
        g = logits.sub_(lse[:, None]).exp_()
        g[torch.arange(len(t), device=g.device), safe] -= 1
        g.mul_(valid[:, None])
        low = low_buf[:len(t)].copy_(g) if low_precision else g
        # written in place (out= / addmm_): a [V, H] temporary per chunk would cost as
        # much memory traffic as the logits at a large vocabulary
        if grad_hidden is not None:
            rows_out = grad_hidden[start:start + rows]
            if rows_out.dtype == w.dtype:
                torch.mm(low, w, out=rows_out)
            else:
                rows_out.copy_(low @ w)
        if grad_weight is not None:
            if not low_precision:
                grad_weight.addmm_(low.t(), h)
            else:  # the product in its dtype, accumulated in fp32
                torch.mm(low.t(), h, out=product)
                grad_weight += product if product32 is None else product32.copy_(product)
        if grad_bias is not None:
            grad_bias += g.sum(0)
    return loss, correct, (grad_hidden, grad_weight, grad_bias)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows, count_correct):
        loss, correct, grads = _chunked(hidden, weight, bias, targets, rows, count_correct,
                                        ctx.needs_input_grad[:3])
        ctx.save_for_backward(*grads)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, grad_correct):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_loss
        return (None if grad_hidden is None else grad_hidden * scale.to(grad_hidden.dtype),
                None if grad_weight is None else (grad_weight * scale).to(ctx.dtypes[0]),
                None if grad_bias is None else (grad_bias * scale).to(ctx.dtypes[1]),
                None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None,
                         count_correct: bool = False,
                         rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy of ``hidden @ weight.T + bias`` against ``targets``, number
    of rows whose argmax is the target: 0 unless ``count_correct``), skipping targets
    equal to -100.

    hidden [N, H], weight [V, H], bias [V], targets [N]. The loss is fp32 and
    differentiable in hidden, weight and bias; its gradients are computed in the forward
    pass, so call it where the loss will be backpropagated (or under no_grad, where no
    gradient is computed).
    """
    rows = rows or chunk_rows(weight.shape[0], hidden.device)
    if not torch.is_grad_enabled():  # evaluation: no gradient is computed at all
        return _chunked(hidden, weight, bias, targets, rows, count_correct,
                        (False, False, False))[:2]
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, rows, count_correct)
