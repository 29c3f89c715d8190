"""The SFT trainer on megatron-core (pretrain_sft.py is its thin entry point): typed configuration,
packed-sequence data, attention for packed sequences, loss, the training loop and checkpoints."""
