"""The data pipeline: align the AM-Thinking subsets, apply the AM-thinking chat template with
LLaMA-Factory's semantics, pack conversations and write Megatron indexed files.

Modules: `conversation` (validity rule), `align` (subsets -> one parquet), `template` (the chat
template, its encoding and truncation), `packing` (best-fit decreasing), `pipeline` (tokenise, spill,
pack, write), `tokenizer` (loading, fingerprint, offline Qwen2.5 build), `sample_data` (the bundled
synthetic snapshot), `stats` (length summaries). Entry points: tools/get_am_dataset.py and
tools/preprocess_sft.py.
"""
