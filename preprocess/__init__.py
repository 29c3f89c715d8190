"""The data pipeline: align the AM-Thinking subsets, apply the AM-thinking chat template with
LLaMA-Factory's semantics, pack conversations and write the packed format.

Modules: `conversation` (validity rule and drop reasons), `align` (subsets -> one parquet), and the
preprocessor's stages in the order `pipeline` runs them: `source` (the aligned parquet), `encode`
(template + tokenise one record batch), `spill` (every batch, in worker processes, to spill files),
`packing` (best-fit decreasing), `write` (spill -> packed files), `meta` (the dataset's metadata and
summary); `config` holds their settings, `workers` the two process pools, `stats` length summaries.
The template, tokenizer loading and the packed format are shared definitions in `formats/`. Entry
points: tools/get_am_dataset.py and tools/preprocess_sft.py.
"""
