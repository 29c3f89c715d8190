"""The trainer's configuration: YAML + dotted overrides into the typed tree, and validation messages
that name the field and the fix."""

from __future__ import annotations

import pytest

from common.errors import ConfigError
from models.registry import arch_from_config
from sft.config import TrainConfig, dump_config, load_config
from testing.tiny_models import LLAMA31_8B_CONFIG, QWEN3_30B_A3B_CONFIG, QWEN3_32B_CONFIG, QWEN25_32B_CONFIG

ARCH_32B = arch_from_config({**QWEN25_32B_CONFIG, "num_hidden_layers": 64})  # Qwen2.5-32B


def test_defaults_are_the_recipe():
    c = TrainConfig()
    assert (c.optimizer.lr, c.optimizer.beta1, c.optimizer.beta2, c.optimizer.eps) == (1e-4, 0.9, 0.999, 1e-8)
    assert (c.optimizer.weight_decay, c.optimizer.clip_grad, c.optimizer.min_lr) == (0.0, 1.0, 0.0)
    assert (c.schedule.epochs, c.schedule.global_batch_size, c.schedule.warmup_ratio) == (2, 512, 0.05)
    assert c.data.seq_length == 32768


def test_yaml_then_overrides_with_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("parallel:\n  tensor: 4\noptimizer:\n  lr: 2.0e-5\ndata:\n  prefixes: [/d/a]\n")
    c = load_config(
        path,
        [
            "parallel.pipeline=2",
            "optimizer.lr=3e-5",
            "optimizer.clip_grad=2",
            "data.prefixes=[/d/a, /d/b]",
            "data.weights=[1, 3]",
            "checkpoint.keep_last_n=null",
        ],
    )
    assert (c.parallel.tensor, c.parallel.pipeline) == (4, 2)
    assert (
        c.optimizer.lr == 3e-5 and c.optimizer.clip_grad == 2.0 and isinstance(c.optimizer.clip_grad, float)
    )
    assert c.data.prefixes == ["/d/a", "/d/b"] and c.data.weights == [1.0, 3.0]
    assert c.checkpoint.keep_last_n is None
    (tmp_path / "resolved.yaml").write_text(dump_config(c))
    assert load_config(tmp_path / "resolved.yaml") == c  # what checkpoints store loads back unchanged


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "parallel.tensr=2",
            "unknown key parallel.tensr; valid keys here: context, expert, expert_tensor, micro_batch_size",
        ),
        ("model.recompute=most", "model.recompute='most'; choose one of 'none', 'selective', 'full'"),
        ("parallel.tensor=two", "parallel.tensor='two' must be of type int"),
        ("parallel.tensor=true", "parallel.tensor=True must be of type int"),
        ("optimizer=3", "optimizer is a section"),
        ("noequals", "expected key.sub=value"),
    ],
)
def test_bad_keys_and_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def _ready(tmp_path, **overrides) -> TrainConfig:
    prefix = tmp_path / "am"
    for suffix in ("_input_ids.bin", "_input_ids.idx", "_loss_mask.bin", "_loss_mask.idx", "_meta.json"):
        (tmp_path / f"am{suffix}").write_text("")
    (tmp_path / "init").mkdir(exist_ok=True)
    (tmp_path / "init" / "hf_config.json").write_text("{}")
    base = [
        f"data.prefixes=[{prefix}]",
        f"model.init_checkpoint={tmp_path / 'init'}",
        f"checkpoint.save_dir={tmp_path}",
    ]
    return load_config(None, base + [f"{k}={v}" for k, v in overrides.items()])


def test_a_valid_layout_passes(tmp_path):
    c = _ready(tmp_path, **{"parallel.tensor": 8, "parallel.pipeline": 4, "parallel.virtual_pipeline": 2})
    c.validate(world_size=256, te_available=True, arch=ARCH_32B, data_seq_length=32768)
    assert c.parallel.data_parallel(256) == 8


@pytest.mark.parametrize(
    "overrides, world_size, te, message",
    [
        ({"parallel.tensor": 16}, 256, True, "parallel.tensor=16 must divide the attention heads (40)"),
        (
            {"parallel.tensor": 8, "parallel.pipeline": 3},
            264,
            True,
            "64 layers are not divisible by parallel.pipeline x virtual_pipeline = 3",
        ),
        (
            {"parallel.pipeline": 4, "parallel.virtual_pipeline": 32},
            256,
            True,
            "not divisible by parallel.pipeline x virtual_pipeline = 128",
        ),
        (
            {"parallel.tensor": 8, "parallel.micro_batch_size": 3},
            256,
            True,
            "global_batch_size=512 is not divisible by parallel.micro_batch_size x data-parallel size = 3 "
            "x 32",
        ),
        (
            {"parallel.tensor": 3},
            256,
            True,
            "256 processes are not divisible by tensor x pipeline x context = 3",
        ),
        (
            {
                "parallel.tensor": 8,
                "parallel.pipeline": 4,
                "parallel.virtual_pipeline": 2,
                "schedule.global_batch_size": 48,
            },
            256,
            True,
            "needs the 6 micro-batches per step (global batch / (micro_batch_size x data-parallel size)) "
            "to be a "
            "multiple of parallel.pipeline=4",
        ),
        (
            {
                "parallel.context": 2,
                "parallel.tensor": 2,
                "parallel.sequence_parallel": True,
                "data.seq_length": 32764,
            },
            8,
            False,
            "parallel.context=2 cuts every conversation of a row, its trailing padding included, into 2 x "
            "parallel.context x parallel.tensor = 8 equal pieces: the 1 x 32764-token row",
        ),
        (
            {"parallel.tensor": 8, "parallel.sequence_parallel": True, "data.seq_length": 32764},
            8,
            True,
            "splits the 1 x 32764-token row (parallel.micro_batch_size x data.seq_length) across "
            "parallel.tensor=8 ranks",
        ),
        ({"data.seq_length": 16384}, 8, True, "data.seq_length=16384 but the data was packed at 32768"),
        ({"schedule.warmup_ratio": 1.5}, 8, True, "schedule.warmup_ratio=1.5 must be in [0, 1)"),
        ({"checkpoint.keep_last_n": 0}, 8, True, "checkpoint.keep_last_n must be >= 1, or null"),
        (
            {"model.recompute": "selective", "model.recompute_modules": ["layernorm"]},
            8,
            False,
            "model.recompute_modules=[layernorm] needs Transformer Engine",
        ),
    ],
)
def test_layout_problems_name_the_field(tmp_path, overrides, world_size, te, message):
    c = _ready(tmp_path, **overrides)
    with pytest.raises(ConfigError) as info:
        c.validate(world_size=world_size, te_available=te, arch=ARCH_32B, data_seq_length=32768)
    assert message in str(info.value)


def test_sequence_and_context_parallelism_run_without_transformer_engine(tmp_path):
    """megatron-core's local layers with the project's torch RMSNorm (models/decoder/model.py) run SP;
    models/packed_attention.py runs CP (the recipe's layout, scaled to 32 processes)."""
    c = _ready(tmp_path, **{"parallel.tensor": 8, "parallel.sequence_parallel": True})
    c.validate(world_size=8, te_available=False, arch=ARCH_32B, data_seq_length=32768)
    recipe = {"parallel.tensor": 4, "parallel.sequence_parallel": True, "parallel.context": 4}
    _ready(tmp_path, **recipe, **{"parallel.pipeline": 2}).validate(
        world_size=32, te_available=False, arch=ARCH_32B, data_seq_length=32768
    )
    with pytest.raises(ConfigError, match="parallel.sequence_parallel=true needs parallel.tensor > 1"):
        _ready(tmp_path, **{"parallel.sequence_parallel": True}).validate(
            world_size=8, te_available=False, arch=ARCH_32B, data_seq_length=32768
        )


def test_missing_inputs_are_named(tmp_path):
    c = load_config(None, [f"data.prefixes=[{tmp_path / 'nope'}]", f"model.init_checkpoint={tmp_path}"])
    with pytest.raises(ConfigError) as info:
        c.validate(world_size=1, te_available=False)
    text = str(info.value)
    assert f"{tmp_path / 'nope'}_input_ids.bin not found (run tools/preprocess_sft.py first)" in text
    assert "is not a converted checkpoint (no hf_config.json)" in text
    assert "checkpoint.save_dir is not set" in text
    # the dry run's check, on a machine that need not see the data or the save directory: neither is asked
    # for, nor a converted checkpoint (the dry run reads the model's shape, which an HF model gives too)
    c.validate(world_size=1, te_available=False, check_paths=False)
    # an HF model directory where the run needs a converted checkpoint: the message says how to convert
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(ConfigError) as info:
        c = load_config(None, [f"model.init_checkpoint={tmp_path / 'hf'}"])
        c.validate(world_size=1, te_available=False)
    assert (
        f"model.init_checkpoint={tmp_path / 'hf'} is a Hugging Face model, not a converted checkpoint: "
        f"convert it first (tools/convert_hf_to_mcore.py --hf {tmp_path / 'hf'} --out CKPT)"
    ) in str(info.value)


def test_unset_environment_variables_are_named_together_or_kept_as_written(monkeypatch, tmp_path):
    """A run names every unset variable with its keys in one message; `allow_unset` (--print-config, the
    dry run) keeps `${NAME}` as written, and the printed configuration loads back once they are set."""
    from sft.config import unset_variables

    path = tmp_path / "c.yaml"
    path.write_text(
        'model:\n  init_checkpoint: ${T_CKPT}\ndata:\n  prefixes: ["${T_DATA}/a", "${T_DATA}/b"]\n'
        "checkpoint:\n  save_dir: ${T_RUNS}/${T_NAME}\nlogging:\n  metrics_file: ${T_RUNS}/m.jsonl\n"
    )
    for name in ("T_CKPT", "T_DATA", "T_RUNS", "T_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("T_NAME", "k2")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        "the configuration refers to environment variables that are not set: T_CKPT (model.init_checkpoint), "
        "T_DATA (data.prefixes), T_RUNS (checkpoint.save_dir, logging.metrics_file). Export them, or "
        "override those keys on the command line (KEY=VALUE)"
    )
    # an override replaces the reference, so it is no longer asked for
    only_data = r"not set: T_DATA \(data.prefixes\), T_RUNS \(logging.metrics_file\)"
    with pytest.raises(ConfigError, match=only_data):
        load_config(path, ["model.init_checkpoint=/ckpt", "checkpoint.save_dir=/runs"])
    kept = load_config(path, allow_unset=True)
    assert (kept.model.init_checkpoint, kept.data.prefixes, kept.checkpoint.save_dir) == (
        "${T_CKPT}",
        ["${T_DATA}/a", "${T_DATA}/b"],
        "${T_RUNS}/k2",
    )
    assert unset_variables(kept) == {
        "T_CKPT": ["model.init_checkpoint"],
        "T_DATA": ["data.prefixes"],
        "T_RUNS": ["checkpoint.save_dir", "logging.metrics_file"],
    }
    (tmp_path / "printed.yaml").write_text(dump_config(kept))
    monkeypatch.setenv("T_CKPT", "/ckpt")
    monkeypatch.setenv("T_DATA", "/data")
    monkeypatch.setenv("T_RUNS", "/runs")
    resolved = load_config(tmp_path / "printed.yaml")
    assert resolved == load_config(path) and unset_variables(resolved) == {}
    assert (resolved.data.prefixes, resolved.checkpoint.save_dir) == (["/data/a", "/data/b"], "/runs/k2")


def test_shipped_configs_load_and_take_paths_from_the_environment(monkeypatch, tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("K2_INIT_CKPT", "/ckpt/qwen2.5-32b-mcore")
    monkeypatch.setenv("K2_SAVE_DIR", "/runs/k2")
    monkeypatch.delenv("K2_DATA_PREFIX", raising=False)
    with pytest.raises(ConfigError, match=r"not set: K2_DATA_PREFIX \(data.prefixes\)\. Export"):
        load_config(root / "configs" / "k2think_qwen2.5_32b.yaml")
    monkeypatch.setenv("K2_DATA_PREFIX", "/data/am")
    c = load_config(root / "configs" / "k2think_qwen2.5_32b.yaml")
    assert (c.data.prefixes, c.model.init_checkpoint, c.checkpoint.save_dir) == (
        ["/data/am"],
        "/ckpt/qwen2.5-32b-mcore",
        "/runs/k2",
    )
    assert (c.optimizer.lr, c.schedule.global_batch_size, c.data.seq_length, c.schedule.epochs) == (
        1e-4,
        512,
        32768,
        2,
    )
    # Each shipped layout is valid for its model on its GPUs with Transformer Engine (paths aside).
    for name, arch, gpus in (
        ("k2think_qwen2.5_32b.yaml", ARCH_32B, 256),
        ("k2think_qwen3_32b.yaml", arch_from_config(QWEN3_32B_CONFIG), 256),
        ("llama3.1_8b.yaml", arch_from_config(LLAMA31_8B_CONFIG), 8),
        ("qwen3_30b_a3b.yaml", arch_from_config(QWEN3_30B_A3B_CONFIG), 32),
    ):
        shipped = load_config(root / "configs" / name)
        assert (shipped.schedule.global_batch_size, shipped.data.seq_length, shipped.optimizer.lr) == (
            512,
            32768,
            1e-4,
        )
        problems = str(
            pytest.raises(
                ConfigError,
                shipped.validate,
                world_size=gpus,
                te_available=True,
                arch=arch,
                data_seq_length=32768,
            ).value
        )
        assert "parallel" not in problems and "data.seq_length" not in problems, (name, problems)
    assert load_config(root / "configs" / "tiny_cpu.yaml").device == "cpu"


def test_random_initialisation_is_an_alternative_to_a_checkpoint(tmp_path):
    config_file = tmp_path / "config.json"
    config_file.write_text("{}")
    both = _ready(tmp_path, **{"model.random_init_config": config_file})
    with pytest.raises(ConfigError, match="model.init_checkpoint and model.random_init_config are both set"):
        both.validate(world_size=1, te_available=False)
    c = load_config(
        None,
        [
            f"data.prefixes=[{tmp_path / 'am'}]",
            f"model.random_init_config={tmp_path / 'no.json'}",
            f"checkpoint.save_dir={tmp_path}",
            "checkpoint.resume=none",
        ],
    )
    with pytest.raises(ConfigError, match="random_init_config=.*no.json is not a file") as info:
        c.validate(world_size=1, te_available=False)
    assert "nothing to start from" not in str(info.value)


def test_help_documents_every_key_and_print_config_round_trips(tmp_path, capsys, monkeypatch):
    """`pretrain_sft.py --help` lists every key of the tree with its type, default and the comment that
    explains it in the source (a new key without one fails here); `--print-config` prints the resolved
    configuration, which loads back to the same tree."""
    from pathlib import Path

    import pretrain_sft
    from common.config_docs import describe_tree

    rows = describe_tree(TrainConfig())
    assert [key for key, _, _, doc in rows if not doc] == []
    with pytest.raises(SystemExit):
        pretrain_sft.main(["--help"])
    text = capsys.readouterr().out
    flowing = " ".join(text.split())  # the docs are wrapped
    for key, type_name, default, doc in rows:
        assert f"  {key} ({type_name}, default {default})" in text, key
        assert " ".join(doc.split()) in flowing, key
    assert "  optimizer.lr (float, default 0.0001)" in text and "peak learning rate" in text
    assert "  parallel.virtual_pipeline (int | null, default null)" in text
    assert pretrain_sft.main(["--print-config", "parallel.pipeline=4", "optimizer.lr=3e-5"]) == 0
    printed = capsys.readouterr().out
    (tmp_path / "printed.yaml").write_text(printed)
    assert load_config(tmp_path / "printed.yaml") == load_config(
        None, ["parallel.pipeline=4", "optimizer.lr=3e-5"]
    )
    # a shipped config whose paths are not set prints, with its references as written and a note
    for name in ("K2_INIT_CKPT", "K2_DATA_PREFIX", "K2_SAVE_DIR"):
        monkeypatch.delenv(name, raising=False)
    recipe = Path(pretrain_sft.__file__).parent / "configs" / "k2think_qwen2.5_32b.yaml"
    assert pretrain_sft.main(["--print-config", "--config", str(recipe)]) == 0
    out, err = capsys.readouterr()
    assert "init_checkpoint: ${K2_INIT_CKPT}" in out and "- ${K2_DATA_PREFIX}" in out
    assert err == (
        "note: not set, shown as ${NAME}: K2_INIT_CKPT (model.init_checkpoint), "
        "K2_DATA_PREFIX (data.prefixes), K2_SAVE_DIR (checkpoint.save_dir); "
        "a run needs them exported or the keys overridden\n"
    )
