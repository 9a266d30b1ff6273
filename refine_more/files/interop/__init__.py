"""Foreign formats in and out of the subject format (spec `subject-format.md`, version 1).

- :mod:`.common` -- the error type (one line naming file and key), ``--protocol`` files, validated writes.
- :mod:`.matlab` -- MATLAB v5 (scipy) and v7.3 (HDF5) arrays in MATLAB's index order.
- :mod:`.public_code` -- the paper's public code data folder (``kspace.mat``, ...) → a subject file.
- :mod:`.ismrmrd_io` -- ISMRMRD HDF5 ↔ subject files.
- :mod:`.bids` -- BIDS derivatives from reconstruction outputs.

Conventions and names: ``docs/interop.md``.
"""
