"""The named presets: plain data, the base values a config file or dict selects with
`preset: <name>` (TransformerConfig.preset(name) in code). Only fields of TransformerConfig
may appear; the values are validated like any other."""
from typing import Any, Dict

PRESETS: Dict[str, Dict[str, Any]] = {
    # tests, examples and the synthetic task: byte-level vocabulary, trains in seconds on a CPU
    "tiny": dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192,
                 max_seq_len=128, tie_embeddings=True),
    # benchmarks: a 6-layer model with a 32k vocabulary (~36M parameters)
    "small": dict(vocab_size=32000, d_model=512, n_layers=6, n_heads=8, n_kv_heads=8,
                  d_ff=1408, max_seq_len=2048, tie_embeddings=True),
    # GPT-2-base-sized Llama-style model (~110M parameters)
    "base": dict(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                 d_ff=2048, max_seq_len=2048, tie_embeddings=True),
    # Llama 2 7B (Touvron et al. 2023)
    "llama-7b": dict(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                     d_ff=11008, max_seq_len=4096, norm_eps=1e-5, tie_embeddings=False,
                     rope_base=10000.0),
}
