"""Data: synthetic corpus, storage, image splitting, tokenisation, Grain pipelines, the training batch."""
