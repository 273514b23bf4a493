"""The cross-encoder, its side features, the training tricks, multilingual-e5-small conversion."""
