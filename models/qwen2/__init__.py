"""Qwen2 / Qwen2.5 on megatron-core, bound together in one place:

- `arch`: `Qwen2Arch`, the architecture read from an HF config (the one source of model facts);
- `model`: TransformerConfig, layer spec and GPTModel for an arch;
- `attention`: packed (THD) causal attention for the local (non-TE) layer spec;
- `state_dict_adapter`: the declarative HF <-> megatron-core parameter mapping, both directions;
- `flops`: model FLOPs with attention counted per conversation.
"""
