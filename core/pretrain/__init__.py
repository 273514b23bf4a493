"""Multitask pre-training (MLM, Product2Query, Product2Brand/Color, contrastive)."""
