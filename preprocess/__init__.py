"""The data pipeline: align the AM-Thinking subsets, apply the AM-thinking chat template with
LLaMA-Factory's semantics, pack conversations and write the packed format.

Modules: `conversation` (validity rule and drop reasons), `align` (subsets -> one parquet),
`packing` (best-fit decreasing), `pipeline` (tokenise, spill, pack, write), `stats` (length
summaries). The template, tokenizer loading and the packed format are shared definitions in
`formats/`. Entry points: tools/get_am_dataset.py and tools/preprocess_sft.py.
"""
