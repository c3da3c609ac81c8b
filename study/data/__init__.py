"""Data: cohorts, image checks, synthetic cohorts, the preprocessing cache and the splits.

Owns everything from a participants table and NIfTI files to preprocessed,
labelled subjects in cross-validation folds: reading and checking a cohort
(:mod:`cohort`, :mod:`volumes`), generating one with planted effects
(:mod:`synth`), the float16 cache (:mod:`cache`), family-aware splits
(:mod:`splits`) and a study's cohort made ready (:mod:`prepare`). It knows
nothing of models, maps or MLflow.
"""
