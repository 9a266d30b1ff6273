"""The INR's losses (paper eq. 4–5): loss 1, data consistency of the weighted images W⁽⁰⁾ plus
total variation; loss 2, the signal model's fit of their magnitudes by the maps Q⁽⁰⁾. Whole or
chunk by chunk over the images (memory at the paper's size)."""
from __future__ import annotations

import torch

from .physics import ScanPhysics


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


def inr_losses_chunked(inr, prob: ScanPhysics, tv_weight: float, chunk: int, backward: bool):
    """`inr_losses` over `chunk` images at a time, for memory: MLP1's activations (T·N·hidden) and
    A's coil images (T·C·N) then exist for one chunk at a time; at the paper's size they dominate.

    With `backward`, the gradients of loss 1 + loss 2 are accumulated into the parameters here:
    each chunk's graph is freed by its own backward. The parts all chunks share (the hash
    features and the maps' signal S(Q)) are computed once, cut from the graph as leaves, and
    backpropagated once at the end with what the chunks accumulated in them. Loss 2's normaliser
    (the energy of all images, a constant in `inr_losses` too) takes one more forward pass of
    MLP1 without a graph. Returns (W, c0, loss1, loss2) detached, equal to `inr_losses` to
    float32 rounding."""
    T = inr.n_images
    context = torch.enable_grad if backward else torch.no_grad
    with context():
        h_space, h_time = inr.image_features()
        c0 = inr.map_channels()
        S = prob.signal(c0)
    shared = [h_space, h_time, S]
    leaves = [v.detach().requires_grad_(backward and v.requires_grad) for v in shared]
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
        if pairs:
            torch.autograd.backward([v for v, _ in pairs], [g for _, g in pairs])
    return W, c0.detach(), loss1, loss2
