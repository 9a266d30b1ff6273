"""Physics: the BTS protocol and signal model S(Q), the encoding operator A = U·F·C, coils, B1+,
image phase and the map scaling. Imports only ``refine_more.config`` (no files, networks or reconstruction)."""
