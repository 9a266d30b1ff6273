"""The INR's losses (paper eq. 4–5): loss 1, data consistency of the weighted images W⁽⁰⁾ plus
total variation; loss 2, the signal model's fit of their magnitudes by the maps Q⁽⁰⁾. Whole or
chunk by chunk over the images (memory at the paper's size), and loss 3's data term g chunk by
chunk (`physics_consistency_chunked`, used by objective.RefinementObjective with `image_chunk`)."""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from refine_more.physics.operators import squared_norm
from refine_more.physics.scan import ScanPhysics


def total_variation(x: torch.Tensor, n_images: int | None = None) -> torch.Tensor:
    """Anisotropic TV of complex images (T, Z, Y, X): mean |finite difference| over the 3 spatial axes.
    With `n_images`, x is a chunk of a stack of that many images, and this is its share of the
    stack's TV (the differences are within images, so the shares add up to the whole)."""
    tv = 0.0
    for dim in (1, 2, 3):
        if x.shape[dim] > 1:
            d = torch.diff(x, dim=dim).abs()
            tv = tv + (d.mean() if n_images is None else d.sum() / (d[0].numel() * n_images))
    return tv


def inr_losses(inr, prob: ScanPhysics, tv_weight: float):
    """(W⁽⁰⁾, Q⁽⁰⁾ channels, loss 1 = data consistency + λ·TV, loss 2 = signal-model fit) of the INR."""
    W = inr.images()
    c0 = inr.map_channels()
    loss1 = prob.data_consistency(W) + tv_weight * total_variation(W)
    mag = W.abs() * prob.tissue
    loss2 = (mag - prob.signal(c0)).pow(2).sum() / (mag.pow(2).sum().detach() + 1e-12)
    return W, c0, loss1, loss2


def inr_losses_sampled(inr, prob: ScanPhysics, tv_weight: float, index: torch.Tensor):
    """`inr_losses` on the images `index` alone (a 1-D index tensor), each term an estimate of the
    whole stack's: loss 1's data and TV terms of different images add up, so their sum is scaled by
    T/len(index); loss 2 is relative to the chosen images' energy. MLP1 and A then cost
    len(index)/T of a full iteration (the public code's loss 1 uses one random image per iteration).
    Returns (W of those images, Q⁽⁰⁾ channels, loss 1, loss 2)."""
    T = inr.n_images
    h_space, h_time = inr.image_features()
    W = inr.images_from(h_space, h_time[index])
    c0 = inr.map_channels()
    scale = T / index.numel()
    loss1 = scale * (prob.data_consistency_of(W, index) + tv_weight * total_variation(W, n_images=T))
    mag = W.abs() * prob.tissue
    loss2 = (mag - prob.signal(c0)[index]).pow(2).sum() / (mag.pow(2).sum().detach() + 1e-12)
    return W, c0, loss1, loss2


def inr_losses_chunked(inr, prob: ScanPhysics, tv_weight: float, chunk: int, backward: bool):
    """`inr_losses` over `chunk` images at a time, for memory: MLP1's activations (T·N·hidden) and
    A's coil images (T·C·N) then exist for one chunk at a time; at the paper's size they dominate.

    With `backward`, the gradients of loss 1 + loss 2 are accumulated into the parameters here:
    each chunk's graph is freed by its own backward. The parts all chunks share (the hash
    features and the maps' signal S(Q)) are computed once, cut from the graph as leaves, and
    backpropagated once at the end with what the chunks accumulated in them (S(Q) recomputed
    then rather than its graph held through the chunks). Loss 2's normaliser
    (the energy of all images, a constant in `inr_losses` too) takes one more forward pass of
    MLP1 without a graph. Returns (W, c0, loss1, loss2) detached, equal to `inr_losses` to
    float32 rounding."""
    T = inr.n_images
    context = torch.enable_grad if backward else torch.no_grad
    with context():
        h_space, h_time = inr.image_features()
    with torch.no_grad():   # S(Q)'s graph (MLP2's and the signal model's activations) is rebuilt at the end, not held
        c0 = inr.map_channels()
        S = prob.signal(c0)
    shared = [h_space, h_time]
    leaves = [v.detach().requires_grad_(backward and v.requires_grad) for v in shared] + [S.requires_grad_(backward)]
    hs, ht, Sd = leaves
    starts = range(0, T, chunk)
    with torch.no_grad():
        energy = sum((inr.images_from(hs, ht[t0:t0 + chunk]).abs() * prob.tissue).pow(2).sum() for t0 in starts)
    W = None
    loss1 = loss2 = torch.zeros((), device=S.device)
    for t0 in starts:
        t1 = min(T, t0 + chunk)
        with context():
            Wc = inr.images_from(hs, ht[t0:t1])
            l1 = prob.data_consistency(Wc, t0) + tv_weight * total_variation(Wc, n_images=T)
            l2 = (Wc.abs() * prob.tissue - Sd[t0:t1]).pow(2).sum() / (energy + 1e-12)
            if backward and (l1.requires_grad or l2.requires_grad):
                (l1 + l2).backward()
        if W is None:
            W = torch.empty((T,) + tuple(Wc.shape[1:]), dtype=Wc.dtype, device=Wc.device)
        W[t0:t1] = Wc.detach()
        loss1, loss2 = loss1 + l1.detach(), loss2 + l2.detach()
    if backward:
        pairs = [(v, leaf.grad) for v, leaf in zip(shared, leaves) if v.requires_grad and leaf.grad is not None]
        if Sd.grad is not None:
            with torch.enable_grad():
                S = prob.signal(inr.map_channels())
            pairs += [(S, Sd.grad)] if S.requires_grad else []
        if pairs:
            torch.autograd.backward([v for v, _ in pairs], [g for _, g in pairs])
    return W, c0.detach(), loss1, loss2


class _DataConsistencyChunked(torch.autograd.Function):
    """‖Ax − d‖²/‖d‖² and, when a gradient is wanted, 2Aᴴ(Ax − d)/‖d‖² in the same pass, `chunk`
    images at a time: A's coil images and residual (T·C·N, 20× the images) exist for one chunk,
    and the graph keeps the image-sized gradient instead of them. First-order only."""

    @staticmethod
    def forward(ctx, x, A, d, energy, chunk, with_grad):
        T = x.shape[0]
        value = torch.zeros((), dtype=x.real.dtype, device=x.device)
        grad = torch.empty_like(x) if with_grad else None
        for t0 in range(0, T, chunk):
            t1 = min(T, t0 + chunk)
            Ac = A.images_subset(t0, t1) if (t0, t1) != (0, T) else A
            r = Ac(x[t0:t1]) - d[t0:t1]
            value += squared_norm(r)
            if with_grad:
                grad[t0:t1] = Ac.adjoint(r) * (2.0 / energy)
            del r
        ctx.save_for_backward(grad)
        return value / energy

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return g * grad, None, None, None, None, None


def data_consistency_chunked(prob: ScanPhysics, images: torch.Tensor, chunk: int) -> torch.Tensor:
    """`prob.data_consistency(images)` of all images, computed `chunk` images at a time (equal to
    float32 rounding; no second derivative: not for `unroll.create_graph`)."""
    with_grad = torch.is_grad_enabled() and images.requires_grad
    return _DataConsistencyChunked.apply(images, prob.A, prob.kspace, prob.kspace_energy, chunk, with_grad)


class _EagerGradient(torch.autograd.Function):
    """fn(*inputs), a scalar, with its gradient taken at once in forward: the graph keeps the
    input-sized gradients instead of fn's graph (for g: the signal model's ~30 (T, N)
    intermediates per evaluation, held by each of loss 3's K terms until the backward)."""

    @staticmethod
    def forward(ctx, fn, grad_enabled, *inputs):
        want = [grad_enabled and torch.is_tensor(t) and t.requires_grad for t in inputs]
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() if w else t for t, w in zip(inputs, want)]
            value = fn(*leaves)
            wanted = [leaf for leaf, w in zip(leaves, want) if w]
            grads = torch.autograd.grad(value, wanted, allow_unused=True) if wanted and value.requires_grad else ()
        ctx.want = want
        ctx.save_for_backward(*[torch.zeros_like(leaf) if g is None else g for leaf, g in zip(wanted, grads)])
        return value.detach()

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        saved = iter(ctx.saved_tensors)
        return (None, None) + tuple(g * next(saved) if w else None for w in ctx.want)


def physics_consistency_chunked(prob: ScanPhysics, channels: torch.Tensor, background, chunk: int) -> torch.Tensor:
    """`prob.physics_consistency` (loss 3's data term g) with A applied `chunk` images at a time
    (`data_consistency_chunked`) and its gradient in the maps (and the phase, when it has one)
    taken at once (`_EagerGradient`): equal to float32 rounding; first-order only."""
    def g(q, z):
        return data_consistency_chunked(prob, torch.polar(prob.signal(q), prob.image_phase(z)), chunk)

    return _EagerGradient.apply(g, torch.is_grad_enabled(), channels, background)
