"""The run store and lifecycle: store (runs.db), lifecycle, launcher, supervise, monitor, compare, metric_names."""
