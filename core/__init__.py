"""esci-workbench core: the ML pipeline (data, text, model, training, metrics, runs).

This package never imports :mod:`workbench` (the UI layer).
"""

__version__ = "0.1.0"
