"""The model definitions on megatron-core, shared by the converters, the trainer and the planner.

- `registry`: model_type -> family, the only way to one;
- `decoder/`: the dense decoder the families share (architecture from an HF config, TransformerConfig
  and layer spec, the HF <-> megatron-core parameter mapping, parameters and FLOPs);
- `qwen2/`, `qwen3/`, `llama/`: the families, each its config reader and transformers classes;
- `packed_attention`: per-conversation (THD) attention for megatron-core's local layer spec;
- `backends`: which kernels run here (Transformer Engine or torch) and why;
- `weights`: loading model weights from a torch_dist checkpoint at any layout.

Depends on `formats/` and `common/`; see docs/architecture.md.
"""
