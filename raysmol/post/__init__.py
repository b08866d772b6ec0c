"""Post-training: SFT, DPO, GRPO objectives and model merging."""
