"""Hugging Face checkpoints in and out: hf_import maps HF tensors onto the model, convert_hf writes a checkpoint."""
