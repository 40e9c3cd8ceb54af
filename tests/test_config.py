"""TransformerConfig: presets, round trips, YAML/JSON/env/override precedence, profiles, typed
environment parsing, and every validation error (all problems listed, by field)."""
import json

import pytest

from truthgpt_kernels.config import PRESETS, ConfigError, TransformerConfig

C = TransformerConfig


def env(monkeypatch, **values):
    for k, v in values.items():
        monkeypatch.setenv(f"TRUTHGPT_{k.upper()}", v)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    import os
    for k in list(os.environ):
        if k.startswith("TRUTHGPT_"):
            monkeypatch.delenv(k)


# ============================================================================ presets, round trip
def test_presets_are_data_and_valid():
    assert set(PRESETS) == {"tiny", "small", "base", "llama-7b"}
    for name in PRESETS:
        cfg = C.preset(name)
        for key, value in PRESETS[name].items():
            assert getattr(cfg, key) == value
    assert C.preset("llama-7b").num_parameters() == 6_738_415_616  # Llama 2 7B
    assert C.preset("tiny", n_layers=3).n_layers == 3


COMPLEX = dict(model_type="encoder_decoder", n_encoder_layers=3, n_kv_heads=2, attention="sparse",
               sparsity={"layout": "bigbird", "block_size": 32, "num_random_blocks": 1},
               rope_scaling={"type": "ntk", "factor": 2.0}, ffn="moe", capacity_factor=1.25,
               norm="layernorm", dropout=0.1, backend="reference", dtype="bfloat16")


@pytest.mark.parametrize("kwargs", [{}, COMPLEX, dict(attention="sliding_window", window=[64, 0])],
                         ids=["default", "complex", "window"])
def test_round_trips(kwargs, tmp_path):
    cfg = C(**kwargs)
    assert C.from_dict(cfg.to_dict()) == cfg
    assert C.from_yaml(cfg.to_yaml()) == cfg
    assert C.from_json(cfg.to_json()) == cfg
    cfg.to_yaml(str(tmp_path / "c.yaml"))
    cfg.to_json(str(tmp_path / "c.json"))
    assert C.from_yaml(str(tmp_path / "c.yaml")) == cfg == C.load(str(tmp_path / "c.json"))
    assert json.loads(cfg.to_json()) == cfg.to_dict()


def test_yaml_uses_safe_load(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("d_model: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="cannot parse YAML"):
        C.from_yaml(str(p))


def test_example_configs_load():
    assert C.load("configs/tiny.yaml", env=False) == C.preset("tiny")
    small = C.load("configs/small.yaml", env=False)
    assert small.vocab_size == 256 and small.d_model == PRESETS["small"]["d_model"]
    for profile in ("development", "testing", "production"):
        C.load("configs/profiles.yaml", profile=profile, env=False)


# ============================================================================ precedence, profiles
PROFILE_FILE = """
preset: tiny
n_layers: 3
dropout: 0.05
default_profile: development
profiles:
  development: {n_layers: 2}
  production: {n_layers: 6, d_model: 128, dropout: 0.1}
  testing: {n_layers: 1, backend: reference}
"""


@pytest.fixture
def profile_file(tmp_path):
    p = tmp_path / "profiles.yaml"
    p.write_text(PROFILE_FILE)
    return str(p)


def test_precedence_defaults_file_env_overrides(tmp_path, monkeypatch):
    p = tmp_path / "c.yaml"
    p.write_text("d_model: 128\nn_heads: 4\nn_layers: 3\nvocab_size: 1000\n")
    cfg = C.load(str(p))
    assert (cfg.d_model, cfg.n_layers, cfg.vocab_size, cfg.max_seq_len) == (128, 3, 1000, 2048)
    env(monkeypatch, n_layers="5", vocab_size="2000")
    cfg = C.load(str(p))
    assert (cfg.d_model, cfg.n_layers, cfg.vocab_size) == (128, 5, 2000)  # env beats file
    cfg = C.load(str(p), n_layers=7)
    assert (cfg.n_layers, cfg.vocab_size) == (7, 2000)                     # overrides beat env
    assert C.load(str(p), env=False).n_layers == 3                         # env off
    assert C.load().n_layers == 5 and C.load(env=False) == C()             # no file


def test_profiles(profile_file, monkeypatch):
    assert C.load(profile_file).n_layers == 2                              # default_profile
    prod = C.load(profile_file, profile="production")
    assert (prod.n_layers, prod.d_model, prod.dropout, prod.vocab_size) == (6, 128, 0.1, 256)
    env(monkeypatch, profile="testing")
    t = C.load(profile_file)                                               # TRUTHGPT_PROFILE
    assert (t.n_layers, t.backend, t.dropout) == (1, "reference", 0.05)
    assert C.load(profile_file, profile="production").n_layers == 6        # argument beats env
    env(monkeypatch, n_layers="4")
    assert C.load(profile_file).n_layers == 4                              # env beats profile
    assert C.load(profile_file, n_layers=9).n_layers == 9
    with pytest.raises(ConfigError, match=r"unknown profile 'prodution'.*did you mean 'production'"):
        C.load(profile_file, profile="prodution")


def test_profile_errors(tmp_path):
    p = tmp_path / "plain.yaml"
    p.write_text("n_layers: 2\n")
    with pytest.raises(ConfigError, match="no 'profiles' section"):
        C.load(str(p), profile="production")
    with pytest.raises(ConfigError, match="without a config file"):
        C.load(profile="production")
    with pytest.raises(ConfigError, match="does not exist"):
        C.load(str(tmp_path / "missing.yaml"))
    p.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        C.load(str(p))


# ============================================================================ environment
def test_env_typed_parsing():
    e = {"TRUTHGPT_N_HEADS": "4", "TRUTHGPT_USE_FLASH_ATTENTION": "false", "TRUTHGPT_DROPOUT": "0.25",
         "TRUTHGPT_TIE_EMBEDDINGS": "0", "TRUTHGPT_GRADIENT_CHECKPOINTING": "YES",
         "TRUTHGPT_N_KV_HEADS": "none", "TRUTHGPT_ATTENTION": "sliding_window",
         "TRUTHGPT_WINDOW": "128,0", "TRUTHGPT_ROPE_SCALING": '{"type": "linear", "factor": 4}',
         "TRUTHGPT_BUILD_CUDA": "0", "TRUTHGPT_CUDA_ARCHS": "9.0", "OTHER": "x"}
    cfg = C.from_env(environ=e)
    assert (cfg.n_heads, cfg.use_flash_attention, cfg.dropout) == (4, False, 0.25)
    assert (cfg.tie_embeddings, cfg.gradient_checkpointing, cfg.n_kv_heads) == (False, True, None)
    assert cfg.window == [128, 0] and cfg.window_tuple == (128, 0)
    assert cfg.rope_scaling == {"type": "linear", "factor": 4}
    assert C.from_env(environ={"TRUTHGPT_ATTENTION": "sliding_window", "TRUTHGPT_WINDOW": "64"}).window == 64
    assert C.from_env(prefix="MY_", environ={"MY_N_LAYERS": "3"}).n_layers == 3
    small = C.from_env(environ={"TRUTHGPT_PRESET": "small", "TRUTHGPT_N_LAYERS": "2"})
    assert (small.d_model, small.n_layers) == (PRESETS["small"]["d_model"], 2)


def test_env_errors_list_every_problem():
    e = {"TRUTHGPT_N_HEAD": "8", "TRUTHGPT_N_LAYERS": "six", "TRUTHGPT_USE_FLASH_ATTENTION": "maybe"}
    with pytest.raises(ConfigError) as info:
        C.from_env(environ=e)
    msg = str(info.value)
    assert "TRUTHGPT_N_HEAD: unknown setting" in msg and "did you mean 'TRUTHGPT_N_HEADS'" in msg
    assert "n_layers: TRUTHGPT_N_LAYERS='six': expected an integer" in msg
    assert "use_flash_attention" in msg and "expected true/false" in msg
    assert len(info.value.problems) == 3


# ============================================================================ validation
ERRORS = [
    # (fields, field that must be named, message fragment)
    (dict(d_model=100, n_heads=8), "d_model", "divisible by n_heads"),
    (dict(n_heads=8, n_kv_heads=3), "n_kv_heads", "multiple of n_kv_heads"),
    (dict(d_model=1024, n_heads=2), "n_heads", "exceeds 256"),
    (dict(model_type="decoder_only"), "model_type", "allowed: decoder, encoder, encoder_decoder"),
    (dict(attention="flash"), "attention", "allowed: full, sliding_window, sparse"),
    (dict(position="rotary"), "position", "allowed: rope, alibi, relative, sinusoidal, learned, none"),
    (dict(ffn="swishglu"), "ffn", "did you mean 'swiglu'"),
    (dict(norm="rms"), "norm", "allowed: rmsnorm, layernorm"),
    (dict(dtype="fp32"), "dtype", "allowed: float32"),
    (dict(backend="gpu"), "backend", "allowed: auto, cpu, cuda, triton, reference"),
    (dict(vocab_size=0), "vocab_size", "must be positive"),
    (dict(d_model=-8), "d_model", "must be positive"),
    (dict(n_layers=0), "n_layers", "must be positive"),
    (dict(n_heads=0), "n_heads", "must be positive"),
    (dict(n_kv_heads=0), "n_kv_heads", "must be positive"),
    (dict(d_ff=0), "d_ff", "must be positive"),
    (dict(max_seq_len=0), "max_seq_len", "must be positive"),
    (dict(n_encoder_layers=-1), "n_encoder_layers", "must be positive"),
    (dict(ffn="moe", n_experts=0), "n_experts", "must be positive"),
    (dict(ffn="moe", n_experts=2, experts_top_k=3), "experts_top_k", "exceeds n_experts"),
    (dict(ffn="moe", capacity_factor=0.0), "capacity_factor", "must be positive"),
    (dict(init_std=float("inf")), "init_std", "must be finite and positive"),
    (dict(init_std=float("nan")), "init_std", "must be finite and positive"),
    (dict(ffn="moe", moe_aux_loss_weight=float("nan")), "moe_aux_loss_weight", "must be finite and >= 0"),
    (dict(softcap=float("inf")), "softcap", "must be finite and >= 0"),
    (dict(d_model=10 ** 7), "d_model", "absurdly large"),
    (dict(vocab_size=10 ** 9), "vocab_size", "absurdly large"),
    (dict(max_seq_len=10 ** 8), "max_seq_len", "absurdly large"),
    (dict(d_model=16384, n_heads=128, n_layers=1000, d_ff=200000), "d_model", "parameters"),
    (dict(attention="sliding_window", window=0), "window", "must be >= 1"),
    (dict(attention="sliding_window", window=[1, 2, 3]), "window", "pair [left, right]"),
    (dict(attention="sliding_window", window=[-2, 0]), "window", ">= -1"),
    (dict(attention="sliding_window", window="wide"), "window", "must be an integer or a list"),
    (dict(attention="sliding_window", window=[1.5, 0]), "window", "pair [left, right] of integers"),
    (dict(attention="sliding_window"), "window", "needs a window"),
    (dict(window=64), "window", "set attention: sliding_window"),
    (dict(attention="sparse"), "sparsity", "needs sparsity"),
    (dict(attention="sparse", sparsity={"layout": "bigbrid"}), "sparsity", "did you mean 'bigbird'"),
    (dict(attention="sparse", sparsity={"layout": "local", "stride": 2}), "sparsity", "unknown parameter 'stride'"),
    (dict(attention="sparse", sparsity={"layout": "local", "block_size": 0}), "sparsity", "block_size"),
    (dict(sparsity={"layout": "local"}), "sparsity", "set attention: sparse"),
    (dict(rope_scaling={"type": "yarn"}), "rope_scaling", "linear, ntk, llama3"),
    (dict(rope_scaling={"type": "linear"}), "rope_scaling", "needs a 'factor'"),
    (dict(rotary_dim=7), "rotary_dim", "must be even"),
    (dict(dropout=1.0), "dropout", "[0, 1)"),
    (dict(norm_eps=0.0), "norm_eps", "(0, 1)"),
    (dict(rope_base=0.0), "rope_base", "must be finite and positive"),
    (dict(softcap=-1.0), "softcap", ">= 0"),
    (dict(n_layers=2.5), "n_layers", "must be an integer"),
    (dict(n_layers=True), "n_layers", "must be an integer"),
    (dict(tie_embeddings="yes"), "tie_embeddings", "true or false"),
    (dict(d_ff="big"), "d_ff", "an integer or null"),
    (dict(sparsity=["local"]), "sparsity", "a mapping or null"),
]


@pytest.mark.parametrize("kwargs,field,fragment", ERRORS, ids=[f"{e[1]}-{i}" for i, e in enumerate(ERRORS)])
def test_each_validation_error(kwargs, field, fragment):
    with pytest.raises(ConfigError) as info:
        C(**kwargs)
    assert field in info.value.fields, str(info.value)
    messages = " | ".join(m for f, m in info.value.problems if f == field)
    assert fragment in messages, str(info.value)


def test_every_problem_is_listed_at_once():
    with pytest.raises(ConfigError) as info:
        C(d_model=100, n_heads=8, ffn="swigl", vocab_size=-1, dropout=2.0, backend="gpu",
          attention="sliding_window", window=[1, 2, 3])
    assert {"d_model", "ffn", "vocab_size", "dropout", "backend", "window"} <= set(info.value.fields)
    text = str(info.value)
    assert text.startswith("invalid TransformerConfig (6 problems)")
    assert "  - ffn: unknown ffn 'swigl'" in text


def test_unknown_keys_and_presets_with_hints():
    with pytest.raises(ConfigError) as info:
        C.from_dict({"n_head": 4, "dmodel": 64, "preset": "tinny"})
    text = str(info.value)
    assert "n_head: unknown field (did you mean 'n_heads'?)" in text
    assert "dmodel: unknown field (did you mean 'd_model'?)" in text
    assert "unknown preset 'tinny'" in text and "did you mean 'tiny'" in text
    with pytest.raises(ConfigError, match="expected a mapping"):
        C.from_dict(["n_heads", 4])


def test_unknown_keys_and_bad_values_reported_together():
    """Every problem at once (README): an unknown key no longer hides the known keys' bad values."""
    with pytest.raises(ConfigError) as info:
        C.from_yaml("n_layer: 3\nd_model: -1\nposition: rop\n")
    assert set(info.value.fields) == {"n_layer", "d_model", "position"}
    assert str(info.value).startswith("invalid TransformerConfig (3 problems)")


def test_validation_runs_before_allocation():
    from truthgpt_kernels.modules import Transformer
    with pytest.raises(ConfigError, match="absurdly large"):
        Transformer(vocab_size=10 ** 12)  # would need terabytes if it got as far as nn.Embedding


def test_derived_values():
    c = C(d_model=256, n_heads=8)
    assert (c.head_dim, c.kv_heads, c.ffn_dim) == (32, 8, 704)  # 8/3 * 256 -> multiple of 64
    assert C(ffn="mlp", d_model=256, n_heads=8).ffn_dim == 1024
    assert C(model_type="encoder", attention="sliding_window", window=16).window_tuple == (16, 16)
    assert C(attention="sliding_window", window=16).window_tuple == (16, 0)
    assert C(backend="auto").op_backend is None and C(backend="cpu").op_backend == "cpu"
    assert C(use_flash_attention=False).attention_backend == "reference"
    with pytest.raises(ConfigError):
        C().replace(n_heads=7)
