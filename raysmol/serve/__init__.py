"""Inference engines in Ray actors (vLLM, transformers) for evaluation and GRPO rollouts."""
