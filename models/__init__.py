"""The model definitions on megatron-core, shared by the converters, the trainer and the planner.

- `qwen2/`: Qwen2/Qwen2.5 (architecture from an HF config, TransformerConfig and layer spec, packed
  attention, the HF <-> megatron-core parameter mapping, FLOP count);
- `parallel_layout`: the tensor x pipeline x context x data layout and its validity rules;
- `backends`: which kernels run here (Transformer Engine or torch) and why;
- `weights`: loading model weights from a torch_dist checkpoint at any layout.

Depends on `formats/` and `common/`; see docs/architecture.md.
"""
