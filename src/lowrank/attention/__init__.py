"""Compressed attention: the attention wrapper, latent and projected codecs, cache classes and RoPE
helpers."""
