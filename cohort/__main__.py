"""``python -m cohort run MANIFEST --out DIR ...`` (same as ``refine-more cohort run ...``)."""
import sys

from .cli import main

sys.exit(main())
