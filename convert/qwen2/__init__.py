"""Qwen2 / Qwen2.5 on megatron-core: `model` (the one model definition, from an HF config.json) and
`state_dict_adapter` (the declarative HF <-> megatron-core parameter mapping)."""
