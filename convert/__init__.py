"""Qwen2.5 checkpoints between Hugging Face and megatron-core (the conversion issue builds this out).

For now it holds `tiny_models`, which writes small random Qwen2 models for tests and the demo.
"""
