"""Label cleaning by confident learning (cleanlab)."""
