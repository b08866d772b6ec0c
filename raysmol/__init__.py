"""raysmol: train small LLMs the Smol Training Playbook way, on Ray."""

__version__ = "0.1.0"
