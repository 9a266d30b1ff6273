"""HTML reports people look at: one self-contained page per result folder (subject.py) built from
the folder's files alone, and what the cohort report (cohort/report.py) shares with it: the
templates, figure embedding (html.py) and the folder's diagnostics and QC (data.py)."""
