"""The chain every trainer test and benchmark starts from: an HF model -> its torch_dist conversion ->
a packed dataset, plus the configuration overrides that point a run at them.

    inputs = training_inputs(tmp, random_packs(12, 64, QWEN25_VOCAB_SIZE_SMALL), seq_length=64, layers=4)
    config = load_config(None, inputs.overrides(tmp / "run", "schedule.global_batch_size=4"))
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from formats.packed import validation_prefix

from .synthetic_packs import write_packed_dataset
from .tiny_models import make_tiny_model


@dataclass(frozen=True)
class TrainingInputs:
    hf: Path  # the Hugging Face model directory
    mcore: Path  # its conversion: model.init_checkpoint
    prefix: Path  # the packed dataset: data.prefixes
    seq_length: int
    packs: list  # what the dataset holds: per pack, a list of (token ids, loss mask) conversations
    valid_packs: list | None = None  # the held-out dataset PREFIX_valid, when written

    def overrides(self, save_dir: str | Path, *extra: str) -> list[str]:
        """Trainer overrides for a run on these inputs, saving to `save_dir`, then `extra`. The end-of-run
        plot and the TensorBoard files are off (seconds per run in a suite of dozens of runs); the tests
        of those features turn them on in `extra`."""
        return [
            f"data.prefixes=[{self.prefix}]",
            f"model.init_checkpoint={self.mcore}",
            f"checkpoint.save_dir={save_dir}",
            f"data.seq_length={self.seq_length}",
            "logging.plot=false",
            "logging.tensorboard=false",
            *extra,
        ]


def training_inputs(
    root: str | Path,
    packs: list,
    seq_length: int,
    *,
    hf: str | Path | None = None,
    layers: int = 2,
    tied: bool = False,
    valid_packs: list | None = None,
    pad_multiple: int = 1,
) -> TrainingInputs:
    """Converts `hf` (default: a new tiny random Qwen2 with `layers` layers) with the project's converter
    and writes `packs` as a packed dataset, and `valid_packs` as its held-out set, all under `root`
    (packed with `pad_multiple`, which must fit them: see random_packs)."""
    from convert.hf_to_mcore import convert_hf_to_mcore
    from models.registry import read_arch

    root = Path(root)
    hf = (
        Path(hf)
        if hf is not None
        else make_tiny_model(root / "hf", "qwen2", num_layers=layers, tie_word_embeddings=tied)
    )
    convert_hf_to_mcore(hf, root / "mcore", progress=False)
    vocab_size = read_arch(hf).vocab_size
    prefix = write_packed_dataset(root / "data" / "packs", packs, seq_length, vocab_size, pad_multiple)
    if valid_packs is not None:
        write_packed_dataset(validation_prefix(prefix), valid_packs, seq_length, vocab_size, pad_multiple)
    return TrainingInputs(hf, root / "mcore", prefix, seq_length, packs, valid_packs)


def checkpoint_weights(checkpoint: str | Path) -> dict:
    """Every model tensor of a torch_dist checkpoint, whole (the optimizer's state left out)."""
    from formats.torch_dist import TorchDistReader

    reader = TorchDistReader(checkpoint)
    return {
        key: reader.read(key, (0,) * len(meta.size), tuple(meta.size))
        for key, meta in reader.tensors.items()
        if not key.startswith("optimizer")
    }
