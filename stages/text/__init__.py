"""Text stages: tokenizer training on caption arrows (stage `tokenizer.train`)."""
