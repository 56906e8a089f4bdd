"""The optimiser races, calibrations and studies. They use the library's public API; run them
through the thin CLIs in ``scripts/`` (``benchmark_optimizers.py``,
``calibrate_distill_target.py``, ``benchmark_shape_generalisation.py``)."""
