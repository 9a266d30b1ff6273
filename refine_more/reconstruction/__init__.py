"""Reconstruction (paper Fig. 1): INR losses (1, 2), the unrolled refinement (loss 3), the classical
and self-supervised solvers, ``reconstruct`` and LoRA adaptation. Imports every layer below it."""
