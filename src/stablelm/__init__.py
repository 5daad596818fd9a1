"""StableLM language models in plain PyTorch, checkpoint- and output-compatible with transformers."""

from .auto import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)
from .generation.streaming import TextIteratorStreamer, TextStreamer
from .io.hub import demo_model_path
from .io.tokenizer import BatchEncoding, Tokenizer
from .models.cache import KVCache
from .models.config import StableLmConfig
from .models.generation_config import GenerationConfig
from .models.model import (
    StableLmForCausalLM,
    StableLmForSequenceClassification,
    StableLmForTokenClassification,
    StableLmModel,
)
from .pipeline import pipeline

__version__ = "0.1.0"


__all__ = [
    "AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification", "AutoTokenizer", "BatchEncoding", "GenerationConfig", "KVCache",
    "StableLmConfig", "StableLmForCausalLM", "StableLmForSequenceClassification",
    "StableLmForTokenClassification", "StableLmModel", "TextIteratorStreamer", "TextStreamer", "Tokenizer",
    "demo_model_path", "pipeline",
]
