"""Evaluation: LightEval CF/MCF scoring, freeform GSM8K and HumanEval, the code sandbox."""
