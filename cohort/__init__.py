"""Cohort reconstruction on Ray: ``refine-more cohort run`` / ``python -m cohort run``.

- :mod:`cohort.manifest` -- manifest reading, subject-id and path checks, up-front validation.
- :mod:`cohort.driver` -- plain functions: ``run_subject``, ``run_seed``, ``run_cohort``.
- :mod:`cohort.tasks` -- thin ``@ray.remote`` wrappers over the driver's functions.
- :mod:`cohort.tracking` -- MLflow parent/child runs, logged by the driver only.
- :mod:`cohort.plots` -- montage, loss and summary figures.
- :mod:`cohort.cli` -- ``main(argv)``.
"""
