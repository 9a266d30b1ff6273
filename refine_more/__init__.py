"""REFINE-MORE, the method, in layers that import downwards only (tests/test_structure.py):
config → physics → files → {baselines, networks, evaluation} → reconstruction → cli, describe."""
