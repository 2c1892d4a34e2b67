"""Evaluation building blocks: local lm-eval task folders, dev objectives and quality gates."""
