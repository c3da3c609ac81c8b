"""Output: the only place that writes results anywhere a person reads them.

:mod:`publish` turns the stages' results into MLflow runs (through
:mod:`tracking`), the HTML report (:mod:`report`, with :mod:`figures`) and the
console. No other part of the package imports MLflow or prints results.
"""
