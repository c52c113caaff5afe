"""tunelab: one toolkit from an open LLM and a dataset to a fine-tuned, evaluated, served model."""

from tunelab.errors import TunelabError

__version__ = "0.1.0"
__all__ = ["TunelabError", "__version__"]
