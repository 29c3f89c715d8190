"""Checkpoint conversion HF <-> megatron-core torch_dist, through the tools and files: bitwise round
trips, logits against transformers at TP=2/PP=2, export of checkpoints megatron-core saved at another
layout, chunked storage, and the errors bad inputs get."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from common.distributed import run_distributed
from common.errors import CheckpointError, InputError
from convert.hf_to_mcore import plan_chunks
from convert.verify import hf_logits, sample_token_ids, verify_conversion
from formats.chat_template import AM_THINKING, LLAMA3, QWEN3
from formats.hf_safetensors import HFSafetensorsReader
from formats.run_files import TRAINING_DATA_FILE, iteration_dir_name
from formats.torch_dist import (
    Chunk,
    TorchDistReader,
    checkpoint_problems,
    resolve_checkpoint,
    write_checkpoint,
)
from models.decoder.state_dict_adapter import bound_mappings
from models.registry import arch_from_config, read_arch
from testing.template_text import render

from mcore_ranks import resave_at_layout, stock_load_matches_ours
from tools_runner import run_tool


@pytest.fixture(scope="module")
def converted(tiny_qwen2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mcore") / "ckpt"
    assert (
        run_tool("convert_hf_to_mcore", ["--hf", str(tiny_qwen2_dir), "--out", str(out), "--chunk-mb", "1"])
        == 0
    )
    return out


def assert_same_weights(expected_dir, actual_dir):
    expected, actual = HFSafetensorsReader(expected_dir), HFSafetensorsReader(actual_dir)
    assert actual.keys() == expected.keys()
    for key in expected.keys():
        a, b = expected.read(key), actual.read(key)
        assert a.dtype == b.dtype and torch.equal(a, b), key


@pytest.mark.slow  # a training run, a subprocess or a full pipeline: test-fast stays under 90 s
def test_round_trip_through_files_is_bitwise(tiny_qwen2_dir, converted, qwen_tokenizer_dir, tmp_path):
    out = tmp_path / "release"
    assert (
        run_tool(
            "convert_mcore_to_hf",
            [
                "--mcore",
                str(converted),
                "--out",
                str(out),
                "--tokenizer",
                str(qwen_tokenizer_dir),
                "--max-shard-gb",
                "0.03",
            ],
        )
        == 0
    )
    assert_same_weights(tiny_qwen2_dir, out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2  # sharded at the requested size
    original = json.loads((tiny_qwen2_dir / "config.json").read_text())
    exported = json.loads((out / "config.json").read_text())
    assert arch_from_config(exported) == arch_from_config(original)
    # also where transformers 4 reads it (vLLM's pins, LLaMA-Factory 0.9.3): without it, a base of 10000
    assert exported["rope_theta"] == exported["rope_parameters"]["rope_theta"] == 1e6

    from transformers import AutoTokenizer, GenerationConfig

    ids = sample_token_ids(original["vocab_size"], 2, 16)
    assert torch.equal(hf_logits(out, ids), hf_logits(tiny_qwen2_dir, ids))
    tokenizer = AutoTokenizer.from_pretrained(out)
    turns = ["What is 2+2?", "<think>\nsimple\n</think>\n<answer>4</answer>"]
    messages = [{"role": r, "content": c} for r, c in zip(("user", "assistant"), turns, strict=True)]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == render(AM_THINKING, None, turns)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>" and exported["eos_token_id"] == im_end
    assert im_end in GenerationConfig.from_pretrained(out).eos_token_id


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_the_release_config_states_the_rope_for_transformers_4_and_5(family, tmp_path):
    """transformers 5 writes the rotary settings only under rope_parameters; the release repeats them
    where transformers 4 reads them (rope_theta, and rope_scaling for Llama 3.1's), and transformers 5
    reads the result back unchanged."""
    from transformers import AutoConfig

    from convert.mcore_to_hf import with_transformers4_rope_keys
    from testing.tiny_models import tiny_config

    config = tiny_config(family)
    config.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "rope_theta" not in written  # what transformers 5 leaves out
    both = with_transformers4_rope_keys(written)
    parameters = written["rope_parameters"]
    assert both["rope_theta"] == parameters["rope_theta"]
    if family == "llama":
        assert both["rope_scaling"] == {k: v for k, v in parameters.items() if k != "rope_theta"}
        assert both["rope_scaling"]["rope_type"] == "llama3"
    else:
        assert not both.get("rope_scaling")
    (tmp_path / "config.json").write_text(json.dumps(both))
    assert AutoConfig.from_pretrained(tmp_path).rope_parameters == config.rope_parameters


@pytest.mark.slow  # four gloo ranks: test-fast stays under 90 s
def test_logits_match_transformers_at_tp2_pp2(tiny_qwen2_dir, converted):
    result = verify_conversion(
        tiny_qwen2_dir, converted, tensor_parallel=2, pipeline_parallel=2, seq_length=24
    )
    assert result.max_abs_diff <= 1e-4 and result.top1_agreement == 1.0, result.summary()


@pytest.mark.slow
def test_verify_tool_at_tp1(tiny_qwen2_dir, converted, capsys):
    assert (
        run_tool(
            "verify_conversion",
            ["--hf", str(tiny_qwen2_dir), "--mcore", str(converted), "--seq-length", "16", "--device", "cpu"],
        )
        == 0
    )
    assert "PASS" in capsys.readouterr().out


@pytest.mark.slow
def test_checkpoint_saved_at_tp2_pp2_exports_the_same_weights(
    tiny_qwen2_dir, converted, qwen_tokenizer_dir, tmp_path
):
    run_dir = tmp_path / "run"
    run_distributed(resave_at_layout, 4, str(converted), str(run_dir / iteration_dir_name(7)), 2, 2)
    (run_dir / iteration_dir_name(9)).mkdir()  # an interrupted save: not complete, never picked
    assert resolve_checkpoint(run_dir) == run_dir / iteration_dir_name(7)
    chunks = (
        TorchDistReader(run_dir / iteration_dir_name(7))
        .tensors["decoder.layers.mlp.linear_fc1.weight"]
        .chunks
    )
    assert len(chunks) == 2 * 2 * 2  # layers (one per stage) x TP x (gate, up): really a different layout
    out = tmp_path / "release"
    assert (
        run_tool(
            "convert_mcore_to_hf",
            ["--mcore", str(run_dir), "--out", str(out), "--tokenizer", str(qwen_tokenizer_dir)],
        )
        == 0
    )
    assert_same_weights(tiny_qwen2_dir, out)


@pytest.mark.slow
@pytest.mark.parametrize("tensor_parallel, pipeline_parallel", [(1, 1), (2, 1), (1, 2)])
def test_stock_megatron_core_loads_a_converted_checkpoint(converted, tensor_parallel, pipeline_parallel):
    """No project code on the loading side: megatron-core's default dist_checkpointing.load and a strict
    load_state_dict accept the converted checkpoint at every layout, and give the project loader's weights."""
    results = run_distributed(
        stock_load_matches_ours,
        tensor_parallel * pipeline_parallel,
        str(converted),
        tensor_parallel,
        pipeline_parallel,
    )
    assert all(count > 0 and as_shipped_fails is None for count, as_shipped_fails in results)


def test_converted_checkpoints_hold_the_extra_state_megatron_core_expects(converted):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from models.decoder.state_dict_adapter import extra_state_objects

    stored = FileSystemReader(str(converted)).read_metadata().state_dict_metadata
    objects = {key for key, meta in stored.items() if isinstance(meta, BytesStorageMetadata)}
    arch = read_arch(converted)
    assert objects == set(extra_state_objects(arch))
    assert "decoder.layers.self_attention.linear_proj._extra_state/shard_1_2" in objects  # layer 1 of 2
    # Transformer Engine's final RMSNorm (a te.pytorch.ops operation) has extra state too: one object
    assert "decoder.final_layernorm._extra_state/shard_0_1" in objects
    assert not any("q_layernorm" in key for key in objects)  # Qwen2 has no per-head norms


def test_chunks_tile_every_tensor_within_the_size_cap(tiny_qwen2_dir):
    arch = read_arch(tiny_qwen2_dir)
    cap = 8 << 10
    chunks = plan_chunks(arch, HFSafetensorsReader(tiny_qwen2_dir), torch.float32, max_chunk_bytes=cap)
    by_key: dict[str, list[Chunk]] = {}
    for chunk in chunks:
        assert chunk.nbytes <= max(cap, 4 * chunk.global_shape[-1])  # one row may exceed a tiny cap
        by_key.setdefault(chunk.key, []).append(chunk)
    for m in bound_mappings(arch, "te"):
        lead = len(m.lead)
        covered = sum(
            c.sizes[lead] for c in by_key[m.dist_key] if c.offsets[:lead] == tuple(i for i, _ in m.lead)
        )
        assert covered == m.mcore_shape[0], m.dist_key
    fc1 = [c for c in by_key["decoder.layers.mlp.linear_fc1.weight"] if c.offsets[0] == 0]
    assert arch.ffn_hidden_size in {c.offsets[1] for c in fc1}  # cut at the gate/up boundary


def test_reader_reassembles_any_region_from_any_chunking(tmp_path):
    full = torch.arange(5 * 6 * 4, dtype=torch.float32).reshape(5, 6, 4)
    chunks = [
        Chunk(
            "t",
            (5, 6, 4),
            (i, j, 0),
            (1, 3, 4),
            torch.float32,
            lambda i=i, j=j: full[i : i + 1, j : j + 3].clone(),
        )
        for i in range(5)
        for j in (0, 3)
    ]
    write_checkpoint(tmp_path / "ckpt", chunks, threads=2)
    reader = TorchDistReader(tmp_path / "ckpt")
    assert torch.equal(reader.read("t", (1, 2, 1), (3, 3, 2)), full[1:4, 2:5, 1:3])
    assert torch.equal(reader.read("t", (0, 0, 0), (5, 6, 4)), full)


# the writer thread ends on the exception, as in a real failure; pytest would report that too
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_failure_in_a_writer_thread_fails_the_write(tmp_path):
    """DCP's extra writer threads end on an exception and the save goes on without their files: the
    writer raises it instead of finishing an incomplete checkpoint."""
    import threading
    import time

    def produce(i: int) -> torch.Tensor:
        if threading.current_thread() is not threading.main_thread():
            raise OSError(f"disk went away writing chunk {i}")
        time.sleep(0.2)  # while the main thread writes its file, the other thread takes the other one
        return torch.zeros(1, 4)

    chunks = [Chunk("t", (2, 4), (i, 0), (1, 4), torch.float32, lambda i=i: produce(i)) for i in range(2)]
    with pytest.raises(OSError, match="disk went away writing chunk"):
        write_checkpoint(tmp_path / "ckpt", chunks, threads=2)


# Bad inputs -------------------------------------------------------------------------------------------


def test_bad_sources_are_named(tiny_qwen2_dir, tmp_path, capsys):
    def convert(hf) -> str:
        assert run_tool("convert_hf_to_mcore", ["--hf", str(hf), "--out", str(tmp_path / "out")]) == 2
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
        return capsys.readouterr().err

    missing = shutil.copytree(tiny_qwen2_dir, tmp_path / "missing")
    shard = sorted(missing.glob("model-*.safetensors"))[1]
    shard.unlink()
    assert shard.name in convert(missing) and "missing" in convert(missing)

    truncated = shutil.copytree(tiny_qwen2_dir, tmp_path / "truncated")
    shard = sorted(truncated.glob("model-*.safetensors"))[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 1000)
    assert shard.name in (err := convert(truncated)) and "truncated" in err

    other = shutil.copytree(tiny_qwen2_dir, tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(
        json.dumps({**config, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    )
    assert "supported model types are qwen2" in convert(other)

    wider = shutil.copytree(tiny_qwen2_dir, tmp_path / "wider")
    (wider / "config.json").write_text(
        json.dumps({**config, "intermediate_size": config["intermediate_size"] * 2})
    )
    assert "gate_proj.weight: shape" in convert(wider)

    fewer = shutil.copytree(tiny_qwen2_dir, tmp_path / "fewer")
    (fewer / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    assert "the config does not describe" in convert(fewer) and "model.layers.1." in convert(fewer)


def test_existing_output_needs_force_and_a_crash_leaves_nothing(
    tiny_qwen2_dir, converted, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    assert run_tool("convert_hf_to_mcore", ["--hf", str(tiny_qwen2_dir), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and (out / "keep").exists()

    calls = {"n": 0}
    original = HFSafetensorsReader.read_rows

    def failing(self, key, start, stop, out=None):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk went away")
        return original(self, key, start, stop, out)

    monkeypatch.setattr(HFSafetensorsReader, "read_rows", failing)
    with pytest.raises(OSError, match="disk went away"):
        run_tool("convert_hf_to_mcore", ["--hf", str(tiny_qwen2_dir), "--out", str(out), "--force"])
    assert (out / "keep").exists() and not (tmp_path / "out.partial").exists()  # the old output is untouched
    monkeypatch.undo()
    assert run_tool("convert_hf_to_mcore", ["--hf", str(tiny_qwen2_dir), "--out", str(out), "--force"]) == 0
    assert not (out / "keep").exists() and resolve_checkpoint(out) == out


@pytest.mark.slow  # two exports: test-fast stays under 90 s
def test_the_release_serves_the_training_template_and_the_tokenizer_tokens(
    converted, qwen_tokenizer_dir, llama3_tokenizer_dir, tmp_path
):
    from convert.mcore_to_hf import ReleaseTokens, load_release_tokenizer, release_template, release_thinking

    assert release_template(converted) is AM_THINKING  # converted and never trained: the recipe's
    assert release_thinking(converted, AM_THINKING) is True  # and LLaMA-Factory's default
    with pytest.raises(InputError, match="--no-enable-thinking applies to a reasoning template"):
        release_thinking(converted, AM_THINKING, False)
    trained = shutil.copytree(converted, tmp_path / "trained")
    (trained / TRAINING_DATA_FILE).write_text(json.dumps({"chat_template": "chatml"}))
    with pytest.raises(InputError, match=r"training_data.json: chat template 'chatml' is unknown"):
        release_template(trained)
    assert release_template(trained, "AM-thinking") is AM_THINKING  # --chat-template decides
    (trained / TRAINING_DATA_FILE).write_text(json.dumps({"chat_template": "AM-thinking"}))
    assert release_template(trained) is AM_THINKING
    (trained / TRAINING_DATA_FILE).write_text(
        json.dumps({"chat_template": "qwen3", "enable_thinking": False})
    )
    assert release_thinking(trained, QWEN3) is False and release_thinking(trained, QWEN3, True) is True
    # The pad token is the tokenizer's own; without one (as Llama 3's), its end of text; generation stops
    # at the template's stop token and at the base model's end of text.
    with_pad = shutil.copytree(qwen_tokenizer_dir, tmp_path / "with_pad")
    settings = json.loads((with_pad / "tokenizer_config.json").read_text())
    (with_pad / "tokenizer_config.json").write_text(json.dumps({**settings, "pad_token": "<|fim_pad|>"}))
    for tokenizer_dir, pad, base_eos in (
        (with_pad, "<|fim_pad|>", "<|endoftext|>"),
        (llama3_tokenizer_dir, "<|end_of_text|>", "<|end_of_text|>"),
    ):
        tokenizer, tokens = load_release_tokenizer(tokenizer_dir, AM_THINKING)
        assert tokens == ReleaseTokens("<|im_end|>", pad, ("<|im_end|>", base_eos))
        assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", pad)
    # Llama 3's template: EOS <|eot_id|>; generation also stops at <|eom_id|> (tool calls) and end of text.
    tokenizer, tokens = load_release_tokenizer(llama3_tokenizer_dir, LLAMA3)
    assert tokens == ReleaseTokens(
        "<|eot_id|>", "<|end_of_text|>", ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")
    )
    assert tokenizer.chat_template == LLAMA3.jinja()


def test_export_errors_are_named(converted, tmp_path, capsys):
    def export(*extra) -> str:
        assert (
            run_tool("convert_mcore_to_hf", ["--mcore", str(converted), "--out", str(tmp_path / "o"), *extra])
            == 2
        )
        return capsys.readouterr().err

    assert "pass --tokenizer" in export()
    assert "--iteration applies to a training run directory" in export("--iteration", "3")
    run = tmp_path / "run"
    (run / iteration_dir_name(1)).mkdir(parents=True)
    assert run_tool("convert_mcore_to_hf", ["--mcore", str(run), "--out", str(tmp_path / "o")]) == 2
    assert "complete iter_NNNNNNN" in capsys.readouterr().err


def test_damaged_checkpoints_are_skipped_or_named(converted, tmp_path, caplog, capsys):
    run = tmp_path / "run"
    for iteration in (2, 4):
        shutil.copytree(converted, run / iteration_dir_name(iteration))
    newest = run / iteration_dir_name(4)
    lost = sorted(newest.glob("*.distcp"))[-1]
    lost.unlink()  # a node died before its file was copied
    with caplog.at_level("WARNING"):
        assert resolve_checkpoint(run) == run / iteration_dir_name(2)
    assert f"skipping the damaged checkpoint {newest}: missing {lost.name}" in caplog.text
    with pytest.raises(CheckpointError, match=rf"iter_0000004 is damaged: missing {lost.name}\. Use an"):
        resolve_checkpoint(run, 4)
    assert run_tool("convert_mcore_to_hf", ["--mcore", str(newest), "--out", str(tmp_path / "o")]) == 2
    assert f"is damaged: missing {lost.name}" in capsys.readouterr().err

    short = sorted((run / iteration_dir_name(2)).glob("*.distcp"))[0]
    full = short.stat().st_size  # a DCP data file is its items back to back
    with open(short, "r+b") as f:  # a full quota: the file stops early
        f.truncate(full // 2)
    assert checkpoint_problems(run / iteration_dir_name(2)) == [
        f"{short.name} holds {full // 2:,} bytes, the metadata refers to {full:,}"
    ]
    with pytest.raises(CheckpointError, match="every checkpoint is damaged"):
        resolve_checkpoint(run)
    (run / iteration_dir_name(2) / ".metadata").write_bytes(b"not a pickle")
    assert checkpoint_problems(run / iteration_dir_name(2))[0].startswith(
        f"{run / iteration_dir_name(2) / '.metadata'} cannot be read"
    )
