"""K-fold training: checks before a run (validate), the run (train), one fold (fold_loop), ablations."""
