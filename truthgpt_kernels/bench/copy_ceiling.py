"""The memory-bandwidth ceiling of a case: a plain `dst.copy_(src)` moving the same number of
bytes (half read, half written) as the case counts in `Case.bytes`, timed in the same run.
Its row in the table gives the copy bandwidth, and its "ours speedup" (copy time / ours)
is the fraction of copy bandwidth that ours reaches. Cases list it right after ours, so the
two run back to back (the baselines' many large allocations disturb what runs after them)."""
import torch

NAME = "copy, same bytes (ceiling)"


def with_copy(setup, nbytes, device, dtype):
    """setup() plus a source and a destination buffer of nbytes / 2 each."""
    def wrapped():
        inputs = setup()
        numel = max(1, int(nbytes // 2 // torch.empty((), dtype=dtype).element_size()))
        inputs["copy_src"] = torch.randn(numel, device=device).to(dtype)
        inputs["copy_dst"] = torch.empty_like(inputs["copy_src"])
        return inputs
    return wrapped


def copy(inputs):
    return inputs["copy_dst"].copy_(inputs["copy_src"])
