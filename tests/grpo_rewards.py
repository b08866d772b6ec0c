"""A plain-callable GRPO reward for the tests (imported by name in Ray's reward tasks: `tests.grpo_rewards:digits`).

A random-init model never states the right answer, so exact-answer rewards would all be 0 and no weight would
move; the share of digits in a completion varies within every group, so every step changes the policy."""


def digits(completion: str, row: dict) -> float:
    return sum(ch.isdigit() for ch in completion) / max(1, len(completion))
