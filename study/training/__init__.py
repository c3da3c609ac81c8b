"""Training: the CNN family, the training loop on Ray Train, cross-validation and the search.

Owns how models are built (:mod:`models`), trained and used for prediction
(:mod:`loop`), how each outer fold is searched, trained and tested
(:mod:`crossval`, :mod:`search`) and the classification metrics. Returns
results (:class:`~study.training.crossval.FoldResult`); it never writes to
MLflow, the report or the console.
"""
