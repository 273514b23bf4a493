"""ESCI data in: the official-layout loader (esci), the OpenSearch importer, pair text, folds."""
