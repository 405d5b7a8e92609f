"""Loading policies, references and tokenizers; LoRA/QLoRA wrapping."""
