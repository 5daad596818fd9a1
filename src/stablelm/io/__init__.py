"""Reading and writing the Hugging Face layout: checkpoints, the hub, tokenizers, chat templates."""
