"""Networks: the hash encoding (torch / tcnn), the INR (hashes 1–3, MLP1/2) and the U-Net. Imports
physics (map scaling) and config; never files, baselines, evaluation or reconstruction."""
