"""Qwen2.5 checkpoints between Hugging Face and megatron-core.

`qwen2/` holds the model definition on megatron-core and the declarative HF <-> megatron-core mapping;
`hf_to_mcore`, `mcore_to_hf` and `verify` are the logic of the three conversion tools; `torch_dist`,
`hf_io` and `safetensors_writer` read and write the two formats in bounded memory; `tiny_models`
writes small random Qwen2 models for tests and the demo.
"""
