"""Every op family's bench module loads its cases; the elementwise and linear families' quick
cases run every impl once, and ours agrees with the float64 reference (within bf16 rounding of
the largest value: torch's own bf16 layer_norm weight gradient does not, by 1.3% of it)."""
import pytest
import torch

from truthgpt_kernels.bench import FAMILIES, Case, load_family


@pytest.mark.parametrize("op", FAMILIES)
def test_family_cases_load(op):
    cases = load_family(op, "cpu", quick=True)
    assert cases and all(isinstance(c, Case) and c.op == op for c in cases)


@pytest.mark.parametrize("op", ["geglu", "layer_norm", "linear", "grouped_linear", "swiglu", "rms_norm",
                                "cross_entropy"])
def test_quick_cases_run(op):
    for case in load_family(op, "cpu", quick=True):
        inputs = case.setup()
        ref = case.reference(inputs) if case.reference is not None else None
        for name, impl in case.impls.items():
            out = impl(inputs)
            if ref is not None and name == case.ours:
                got = out if isinstance(out, (list, tuple)) else [out]
                want = ref if isinstance(ref, (list, tuple)) else [ref]
                assert len(got) == len(want)
                for g, w in zip(got, want):
                    scale = w.abs().max().item()
                    torch.testing.assert_close(g.double(), w.double(), rtol=1e-2, atol=4e-3 * scale)
