"""Files and assets: atomic writes, checked paths, the built-in model and corpora, GGUF, text data."""
