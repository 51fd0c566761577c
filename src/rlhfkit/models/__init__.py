from .builtin import SMOLLM2, TINY, materialize_builtin
from .loading import load_causal_lm, load_model_and_tokenizer, load_tokenizer, resolve_model_dir

__all__ = [
    "SMOLLM2",
    "TINY",
    "load_causal_lm",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "materialize_builtin",
    "resolve_model_dir",
]
