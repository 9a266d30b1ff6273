"""Files and formats: subject ids, atomic writes, the subject file (spec v1) and its validator, maps
files and the importers/exporters (``interop``). Imports physics (the protocol) and config only."""
