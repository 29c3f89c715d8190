"""The on-disk formats every stage agrees on, each defined once, with its reader and its writer.

- `packed`: the packed SFT dataset (token ids + loss masks as megatron-core indexed files + meta);
- `torch_dist`: megatron-core torch_dist checkpoints, written and read without a model, and the side
  files that make them self-describing (hf_config.json, tokenizer/, provenance.json);
- `hf_safetensors`: Hugging Face safetensors checkpoints, read and written in bounded memory;
- `chat_template`: the AM-thinking chat template and the recipe's encoding of it;
- `tokenizer`: loading and fingerprinting a local Hugging Face tokenizer.

Depends only on `common/`; see docs/architecture.md.
"""
