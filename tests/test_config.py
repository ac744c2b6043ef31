"""The run configuration and its generated CLI: presets, resolution per device, and every
impossible combination rejected with a message naming the flag.

Run: pytest tests/test_config.py
"""
import pytest

from llmc.config import (ConfigError, ModelConfig, TrainConfig, build_parser, grad_accum_steps,
                         model_config, parse_args, resolve)


def test_presets_match_llmc_shapes():
    assert model_config("d12") == ModelConfig(12, 12, 768)
    assert model_config("d24") == ModelConfig(24, 16, 1024)
    assert model_config("d36") == ModelConfig(36, 20, 1280)
    assert model_config("d48") == ModelConfig(48, 25, 1600)
    assert model_config("d12", n_layer=2).n_layer == 2


def test_unknown_preset_and_bad_heads():
    with pytest.raises(ConfigError, match="unknown model 'd13'"):
        model_config("d13")
    with pytest.raises(ConfigError, match="not divisible by n_head"):
        ModelConfig(2, 5, 64)


def test_parser_is_generated_from_the_dataclass():
    cfg = parse_args(["--batch-size", "8", "--lr", "1e-3", "--dtype", "fp32", "--resume", "auto"])
    assert (cfg.batch_size, cfg.lr, cfg.dtype, cfg.resume) == (8, 1e-3, "fp32", "auto")
    flags = {a.dest for a in build_parser()._actions}
    for needed in ("device", "model", "batch_size", "seq_len", "total_batch_size", "max_steps",
                   "lr", "warmup_steps", "lr_decay_frac", "weight_decay", "grad_clip",
                   "train_data", "val_data", "val_every", "sample_every", "out_dir",
                   "checkpoint_every", "resume", "seed", "dtype", "recompute", "zero"):
        assert needed in flags


@pytest.mark.parametrize("argv", [["--no-such-flag"], ["--batch-size", "eight"],
                                  ["--dtype", "fp16"], ["--device", "tpu"]])
def test_bad_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_resolve_per_device():
    gpu = resolve(TrainConfig(), "cuda")
    assert (gpu.model, gpu.batch_size, gpu.seq_len, gpu.dtype) == ("d12", 16, 1024, "bf16")
    cpu = resolve(TrainConfig(), "cpu")
    assert (cpu.model, cpu.dtype) == ("d4", "fp32")
    assert resolve(TrainConfig(), "cuda", world_size=2).zero == 1
    assert resolve(TrainConfig(), "cuda", world_size=1).zero == 0


def test_total_batch_must_divide():
    cfg = TrainConfig(batch_size=4, seq_len=64, total_batch_size=1000)
    with pytest.raises(ConfigError, match="--total-batch-size 1000 is not a positive multiple"):
        resolve(cfg, "cpu")
    ok = resolve(TrainConfig(batch_size=4, seq_len=64, total_batch_size=1024), "cpu")
    assert grad_accum_steps(ok) == 4
    with pytest.raises(ConfigError, match="world-size"):
        resolve(TrainConfig(batch_size=4, seq_len=64, total_batch_size=256 * 3), "cuda", world_size=2)


def test_seq_len_above_context():
    with pytest.raises(ConfigError, match="--seq-len 2048 is above the model's context of 1024"):
        resolve(TrainConfig(seq_len=2048), "cpu")


@pytest.mark.parametrize("field,value,flag", [("max_steps", 0, "--max-steps"),
                                              ("lr_decay_frac", 2.0, "--lr-decay-frac"),
                                              ("batch_size", 0, "--batch-size")])
def test_out_of_range(field, value, flag):
    with pytest.raises(ConfigError, match=flag):
        resolve(TrainConfig(**{field: value}), "cpu")


def test_classifier_chunks_default_and_check():
    assert resolve(TrainConfig(batch_size=64, seq_len=1024), "cuda").classifier_chunks == 4
    assert resolve(TrainConfig(batch_size=16, seq_len=1024), "cuda").classifier_chunks == 1
    with pytest.raises(ConfigError, match="--classifier-chunks 3 must be >= 1 and divide"):
        resolve(TrainConfig(batch_size=4, seq_len=64, classifier_chunks=3), "cpu")


def test_help_gives_each_default_once():
    """`--help` says every default once, as "[default: ...]", never "(default: None)"."""
    from llmc.config import build_parser
    text = " ".join(build_parser().format_help().split())
    assert "(default:" not in text
    assert "[default: d12 on cuda, d4 on cpu]" in text
    assert "[default: 1337]" in text and "[default: auto]" in text
    for action in build_parser()._actions:
        assert (action.help or "").count("[default") <= 1, action.help
