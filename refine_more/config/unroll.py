"""The unrolled refinement's configuration (stage 2): one dataclass, a docstring per field."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: options added after results were recorded: at these values they are left out of the config
#: hash, so a config that does not use them keeps the hash its results carry (cohort resume, benchmarks)
HASH_NEUTRAL = {"fixed_step": 0.0, "mask_outside_tissue": False, "freeze_map_hash": False}


@dataclass
class UnrollConfig:
    iterations: int = 4
    """K, the number of learned unrolled iterations of the refinement (the paper's "phases": 4)."""
    unet_width: int = 32            # channels of the first U-Net layer
    """Channels of the first layer of the shared residual U-Net."""
    unet_levels: int = 4            # number of 2× downsamplings
    """Number of 2× downsamplings of the U-Net."""
    unet_out_kernel: int = 1
    """Kernel size of the U-Net's last convolution (the public code's: 3)."""
    refine_k: bool = True
    """Refine k with the other maps (4 U-Net channels); False: k passes through (3, the paper's code)."""
    step_init: float = 1.0          # multiplies the line-searched initial step (see unrolled.py)
    """Multiplies the line-searched initial step of each unrolled iteration."""
    # differentiate through the gradient inside each phase (second-order unrolled backprop). Off by
    # default: without a warm start, with Gauss–Newton steps the first-order backprop trained as
    # well or better and stage 2 was 1.45× faster (6×32×32: T1F/f/kF 5.41/5.46/6.39 % in 31.8 s
    # against 5.63/5.75/6.79 % in 46.1 s). From a converged warm start it diverges (`small` is on).
    create_graph: bool = False
    """Exact (second-order) backprop through each unrolled step; False takes the first-order one (docs/decisions/002)."""
    # "gauss-newton": each phase steps along H⁻¹∇g with H the per-voxel Gauss–Newton matrix of the
    # data consistency (physics.ScanPhysics.gauss_newton_direction); "none": the paper's plain ∇g (eq. 8).
    # The maps' four parameters are badly conditioned against each other: on a 6×32×32 subject
    # four plain gradient steps move T1F from 22 % to 19 % nRMSE, four Gauss–Newton steps to 6 %.
    preconditioner: Literal["gauss-newton", "none"] = "gauss-newton"
    """'gauss-newton': steps along H⁻¹∇g (docs/decisions/002); 'none': the paper's plain ∇g (eq. 8)."""
    gn_damping: float = 1e-2        # Levenberg damping, relative to the mean diagonal of H
    """Levenberg damping of the Gauss–Newton matrix, relative to its mean diagonal."""
    refine_phase: bool = True
    """Refine the background image phase φ₀ during the refinement (docs/decisions/007)."""
    phase_steps: int = 1            # phase steps before each map step
    """Background-phase steps before each map step."""
    image_phase_order: int = -1
    """Degree of each image's own polynomial phase deviation δ_t from φ₀ (B0 drift, motion; image_phase.py); −1: none."""
    warm_start_steps: int = 0
    """Unlearned descent (or L-BFGS) iterations before the learned ones; 0 is the paper (docs/decisions/003)."""
    warm_start_solver: Literal["descent", "lbfgs"] = "descent"
    """How the warm start minimises: 'descent' (monotone Gauss–Newton steps, unrolled.descend) or 'lbfgs'
    (16 of those, then L-BFGS jointly over maps and phase, unrolled.quasi_newton; docs/decisions/005)."""
    start: Literal["inr", "llr", "best"] = "inr"
    """Where the warm start starts: 'inr' (the stage-1 INR, the paper's only start), 'llr' (the voxel-wise fit of
    the LLR images) or 'best' (both; the lower objective on the acquired k-space is kept; docs/decisions/020)."""
    # ρ per map (I0, T1F, f, k) of an explicit quadratic smoothness prior added to the refinement's
    # objective (priors.MapSmoothness; weights relative to the data term's curvature), which then
    # starts from sign-canonical channels. All 0 is the paper: the data term alone (over-fitted by
    # a long warm-start descent), the INR's channels as they are.
    map_smoothness: tuple = (0.0, 0.0, 0.0, 0.0)
    """ρ per map (I0, T1F, f, k) of the quadratic smoothness prior on the maps; zeros are the paper (docs/decisions/004)."""
    map_edge_scale: tuple = (0.0, 0.0, 0.0, 0.0)
    """δ per map of that prior (> 0: pseudo-Huber, edges kept; 0: quadratic), × √((ν/s)/reference) with a reference (decision 023)."""
    prior_noise_reference: float = 0.0
    """Noise level ν/s up to which `map_smoothness` holds; above, its weights grow in proportion (decision 022); 0: fixed."""
    training: Literal["full", "self-supervised", "held-out-stop"] = "full"
    """What stage 2 trains on: 'full', loss 3 over all acquired k-space (the paper); 'self-supervised',
    held-out k-space (SSDU: data consistency on Θ, loss on Λ, stop on Γ; ssdu.py; needs a warm start);
    'held-out-stop', the paper's joint training on Ω\\Γ, stopped when the last phase's data term on Γ
    stops falling, with the best weights kept (joint_training.py; no warm start; issue 26)."""
    ssdu_validation_fraction: float = 0.15
    """Self-supervised and held-out-stop: fraction of the acquired samples held out as Γ (only to decide when to stop)."""
    ssdu_loss_fraction: float = 0.4
    """Self-supervised: fraction of the rest held out as Λ (the loss) in each split (SSDU's best ρ)."""
    ssdu_splits: int = 2
    """Self-supervised: number of (Θ, Λ) draws, each with its own warm start on Θ."""
    ssdu_validate_every: int = 5
    """Self-supervised and held-out-stop: iterations between evaluations of the held-out loss on Γ."""
    ssdu_patience: int = 3
    """Self-supervised and held-out-stop: stop after this many evaluations without a lower loss on Γ; the weights of
    the lowest one are kept (the untrained identity counts: the learned stage cannot make Γ worse)."""
    fixed_step: float = 0.0
    """> 0: the public code's data step instead of learned ones: α = this on every map, never trained, times
    the gradient of the mean of |Ax − d|² over the k-space array (the code's α = 1e-3; issue 26). 0: learned."""
    mask_outside_tissue: bool = False
    """The U-Net sees the map channels zeroed outside the tissue (the public code masks the maps there)."""
    freeze_map_hash: bool = False
    """Without a warm start: stage 2 leaves hash 3 as stage 1 trained it and goes on with stage 1's Adam
    (the public code: one Adam over both stages, hash 3 frozen from iteration 1501)."""

