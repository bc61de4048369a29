"""Melanoma Records training package (no Django): layouts, folds, loop, evaluation, export.

Entry point: ``python -m training {train,export,evaluate,embed,context} --help``.
The network and preprocessing shared with the inference worker live in
``training.network`` and ``training.preprocessing``.
"""
