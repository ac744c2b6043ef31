"""Token data: the GPT-2 tokenizer, Arrow token shards, the bundled dataset, the loader."""
