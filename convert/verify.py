"""Checks a converted checkpoint against its Hugging Face original: both models score the same token
sequences in fp32 and their logits are compared.

    python tools/verify_conversion.py --hf /models/Qwen2.5-32B --mcore ckpt/qwen2.5-32b-mcore --tp 8 --pp 1

The megatron-core side runs at the requested tensor/pipeline (and, for a mixture of experts,
expert/expert-tensor) layout (gloo processes on CPU, or one GPU per process), loading the torch_dist
checkpoint through megatron-core's resharding loader, as the trainer does; the HF side is the family's
transformers class (e.g. `Qwen2ForCausalLM`). A correct conversion differs only by floating-point
summation order. A mixture of experts runs with sequence parallelism where TP > 1, as it trains; where
the expert ranks outnumber the tensor ranks, data-parallel replicas make up the world.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from common.distributed import run_distributed
from common.errors import InputError
from formats.torch_dist import resolve_checkpoint
from models.backends import choose_backend
from models.megatron_settings import expert_settings
from models.registry import family_of, read_arch
from models.weights import load_weights
from plan.layout import ParallelLayout, initialize_parallel_state

log = logging.getLogger(__name__)


@dataclass
class VerifyResult:
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    atol: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.atol

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (
            f"max |logit diff| {self.max_abs_diff:.3g}, mean {self.mean_abs_diff:.3g}, "
            f"top-1 agreement {100 * self.top1_agreement:.2f}%: {verdict} (tolerance {self.atol:g})"
        )


def sample_token_ids(vocab_size: int, batch: int, seq_length: int, seed: int = 0) -> list[list[int]]:
    """Seeded random ids over the whole vocabulary (every embedding row is equally likely to be hit)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq_length), generator=generator).tolist()


def load_model_stage(
    checkpoint_dir: str, layout: ParallelLayout, device: str, moe_dispatcher: str = "alltoall"
):
    """Per-rank: initialises `layout`'s process groups, builds this rank's pipeline stage of the
    checkpoint's model in fp32 and loads its weights (megatron-core reshards from whatever layout the
    checkpoint was saved at)."""
    from megatron.core import parallel_state
    from megatron.core import tensor_parallel as tp

    initialize_parallel_state(layout)
    tp.model_parallel_cuda_manual_seed(0)
    arch = read_arch(checkpoint_dir)
    family = family_of(arch)
    on_gpu = device == "cuda"
    experts = expert_settings(arch, layout.expert, layout.expert_tensor_size, moe_dispatcher)
    config = family.transformer_config(
        arch,
        tensor_parallel=layout.tensor,
        pipeline_parallel=layout.pipeline,
        sequence_parallel=layout.sequence_parallel,
        use_cpu_initialization=not on_gpu,
        **experts,
    )
    backend = choose_backend(device)
    log.info("layer spec: %s", backend.describe())
    model = family.build_model(
        arch,
        config,
        family.layer_spec(arch, backend, packed=False),
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    if on_gpu:
        model.cuda()
    load_weights(model, checkpoint_dir)
    return model


def megatron_logits(
    rank: int,
    world_size: int,
    checkpoint_dir: str,
    layout: ParallelLayout,
    token_ids: list[list[int]],
    device: str,
    moe_dispatcher: str = "alltoall",
) -> torch.Tensor | None:
    """Per-rank body: loads this rank's stage and runs the pipeline forward; the first tensor-parallel
    rank of the last stage (of the first data-parallel replica) returns the full-vocabulary fp32 logits
    [b, s, vocab]."""
    from megatron.core import parallel_state
    from megatron.core import tensor_parallel as tp
    from megatron.core.pipeline_parallel import get_forward_backward_func

    on_gpu = device == "cuda"
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    model = load_model_stage(checkpoint_dir, layout, device, moe_dispatcher).eval()
    ids = torch.tensor(token_ids, device=torch.device(device, rank) if on_gpu else "cpu")
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)

    def forward_step(data_iterator, model):
        return model(ids, positions, attention_mask=None), None  # no loss function: the output is kept

    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([None]),
            model=[model],
            num_microbatches=1,
            seq_length=ids.shape[1],
            micro_batch_size=ids.shape[0],
            forward_only=True,
        )
        if not parallel_state.is_pipeline_last_stage():
            return None
        logits = tp.gather_from_tensor_model_parallel_region(outputs[0])
    first = (
        parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0
    )
    return logits.float().cpu() if first else None


def hf_logits(hf_dir: str | Path, token_ids: list[list[int]], device: str = "cpu") -> torch.Tensor:
    import transformers

    model_class = getattr(transformers, family_of(read_arch(hf_dir)).hf_model_class)
    model = model_class.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").to(device)
    with torch.no_grad():
        return model(torch.tensor(token_ids, device=device)).logits.float().cpu()


def compare(expected: torch.Tensor, actual: torch.Tensor, atol: float) -> VerifyResult:
    if expected.shape != actual.shape:
        raise ValueError(f"logits shapes differ: HF {tuple(expected.shape)}, megatron {tuple(actual.shape)}")
    diff = (expected - actual).abs()
    top1 = (expected.argmax(-1) == actual.argmax(-1)).float().mean().item()
    return VerifyResult(diff.max().item(), diff.mean().item(), top1, atol)


def verify_conversion(
    hf_dir: str | Path,
    mcore_dir: str | Path,
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    expert_parallel: int = 1,
    expert_tensor_parallel: int | None = None,
    moe_dispatcher: str = "alltoall",
    batch: int = 2,
    seq_length: int = 64,
    seed: int = 0,
    atol: float = 1e-4,
    device: str | None = None,
) -> VerifyResult:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    checkpoint = resolve_checkpoint(mcore_dir)
    arch = read_arch(checkpoint)
    layout = ParallelLayout(
        tensor=tensor_parallel,
        pipeline=pipeline_parallel,
        expert=expert_parallel,
        expert_tensor=expert_tensor_parallel,
        sequence_parallel=arch.moe is not None and tensor_parallel > 1,
    )
    world_size = pipeline_parallel * math.lcm(tensor_parallel, expert_parallel * layout.expert_tensor_size)
    problems = layout.problems(world_size=world_size, arch=arch)
    if problems:
        raise InputError("cannot load the checkpoint at this layout: " + "; ".join(problems))
    token_ids = sample_token_ids(arch.vocab_size, batch, seq_length, seed)
    log.info(
        "megatron-core: %s at %s on %d %s process(es)",
        checkpoint,
        layout.describe(world_size),
        world_size,
        device,
    )
    results = run_distributed(
        megatron_logits, world_size, str(checkpoint), layout, token_ids, device, moe_dispatcher, device=device
    )
    (ours,) = [r for r in results if r is not None]
    log.info("transformers: %s", hf_dir)
    return compare(hf_logits(hf_dir, token_ids, device), ours, atol)
