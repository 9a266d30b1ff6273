"""Simulation and scoring: the simulator and phantom (they write subject files), nRMSE/SSIM, cohort
tables and plots. Imports physics, files and config; never networks or reconstruction."""
