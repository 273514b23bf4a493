"""Metrics, baselines (BM25, dense), blends, ensembles, submission files, reports."""
