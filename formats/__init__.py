"""The on-disk formats every stage agrees on, each defined once, with its reader and its writer.

- `packed`: the packed SFT dataset (token ids + loss masks as megatron-core indexed files + meta);
- `torch_dist`: megatron-core torch_dist checkpoints, written and read without a model;
- `run_files`: the side files that make them self-describing (hf_config.json, tokenizer/,
  provenance.json, training_data.json) and a run directory's iter_NNNNNNN/ checkpoints, without torch;
- `hf_safetensors`: Hugging Face safetensors checkpoints, read and written in bounded memory;
- `chat_template`: the chat templates by name (the recipe's AM-thinking, qwen, qwen3, llama3), as
  rendered for tokenising and as the Jinja template a release installs;
- `tool_calls`: tool lists and function calls in each template's text (LLaMA-Factory's formats);
- `tokenizer`: loading and fingerprinting a local Hugging Face tokenizer.

Depends only on `common/`; see docs/architecture.md.
"""
