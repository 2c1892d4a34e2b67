"""Hugging Face model folders: chat templates, tokenizers, weights, checkpoints and model cards,
so every model entry loads anywhere a Hub Llama-3.1-Instruct folder does."""
