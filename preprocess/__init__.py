"""The data pipeline: align the AM-Thinking subsets (or read a user's LLaMA-Factory datasets), render
each conversation in a chat template with LLaMA-Factory 0.9.3's semantics, pack conversations and
write the packed format.

Modules: `conversation` (validity rule and drop reasons), `align` (subsets -> one parquet),
`registry` (LLaMA-Factory's dataset_info.json entries), `converters` (rows of the aligned parquet or of
an alpaca/sharegpt dataset -> examples, or a drop reason), `sft_encoding` (LLaMA-Factory's supervised
encoding: pairs -> token ids and loss mask), and the preprocessor's stages in the order `pipeline` runs
them: `source` (the rows, local or from the hub at a pinned revision), `encode` (template + tokenise
one record batch), `spill` (every batch, in worker processes, to spill files), `packing` (best-fit
decreasing), `write` (spill -> packed files), `meta` (the dataset's metadata and summary); `config`
holds their settings, `workers` the two process pools, `stats` length summaries. The chat templates,
tool-call formats, tokenizer loading and the packed format are shared definitions in `formats/`. Entry
points: tools/get_am_dataset.py and tools/preprocess_sft.py.
"""
