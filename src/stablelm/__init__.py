"""StableLM language models in plain PyTorch, checkpoint- and output-compatible with transformers."""

from .auto import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)
from .generation.config import GenerationConfig
from .generation.streaming import TextIteratorStreamer, TextStreamer
from .io.tokenizer import BatchEncoding, Tokenizer
from .models.cache import KVCache
from .models.config import StableLmConfig
from .models.model import (
    StableLmForCausalLM,
    StableLmForSequenceClassification,
    StableLmForTokenClassification,
    StableLmModel,
)
from .pipeline import pipeline

__version__ = "0.1.0"


def demo_model_path():
    """The folder of the demo checkpoint bundled with the package (a small StableLM trained on Shakespeare)."""
    from pathlib import Path

    return Path(__file__).resolve().parent / "demo"


__all__ = [
    "AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification", "AutoTokenizer", "BatchEncoding", "GenerationConfig", "KVCache",
    "StableLmConfig", "StableLmForCausalLM", "StableLmForSequenceClassification",
    "StableLmForTokenClassification", "StableLmModel", "TextIteratorStreamer", "TextStreamer", "Tokenizer",
    "demo_model_path", "pipeline",
]
