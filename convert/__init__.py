"""Checkpoints of every registered family (Qwen2/2.5, Qwen3, Llama 3.x) between Hugging Face and
megatron-core: the logic of the three conversion tools.

- `hf_to_mcore` (tools/convert_hf_to_mcore.py): HF safetensors -> torch_dist, streamed;
- `mcore_to_hf` (tools/convert_mcore_to_hf.py): torch_dist (converted or trained, any layout) -> HF
  release with the chat template installed;
- `verify` (tools/verify_conversion.py): logits of both sides against each other.

The model definitions and the parameter mappings live in `models/` (found through
`models/registry.py`), the file formats in `formats/`.
"""
