"""Classical baselines: the voxel-wise Levenberg–Marquardt fit and LLR-regularised images. Imports
physics and config only; the reconstruction may start from them."""
