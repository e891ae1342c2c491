"""The data layer: the stages from raw text to token shards (prepare, clean, tokenizer, encode),
the token-shard reader, and the labelled tasks' loaders and metrics (GLUE)."""
