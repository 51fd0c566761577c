"""rlhfkit: InstructGPT-style RLHF from a pretrained causal LM to an aligned chat model."""

__version__ = "0.1.0"
