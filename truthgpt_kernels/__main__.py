"""Command line: python -m truthgpt_kernels info | bench"""
import argparse
import platform
import sys


def cmd_info(args):
    import torch

    import truthgpt_kernels as tk
    from truthgpt_kernels import _ext

    rows = [("truthgpt_kernels", tk.__version__), ("python", platform.python_version()),
            ("torch", torch.__version__), ("torch CUDA", torch.version.cuda or "none")]
    try:
        import triton
        rows.append(("triton", triton.__version__))
    except ImportError:
        rows.append(("triton", "not installed"))
    for name in ("_C", "_cuda"):
        mod, info = _ext.load(name)
        rows.append((f"extension {name}", f"built ({info})" if mod else info))
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    rows.append(("device", dev))
    for name, entry in tk.available_backends().items():
        rows.append((f"backend {name}", "available" if entry["available"] else f"unavailable: {entry['reason']}"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def cmd_bench(args):
    from truthgpt_kernels.bench.runner import cli

    return cli(args)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="truthgpt-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, extensions, backends and why any is unavailable")
    bench = sub.add_parser("bench", help="benchmark our kernels against PyTorch: tables, JSON, plot",
                           description="Runs the cases of truthgpt_kernels/bench/<op>.py: ours against "
                           "the PyTorch baselines, with the machine's measured ceilings and the error "
                           "against the float64 reference; saves JSON and a PNG under bench-results/.")
    from truthgpt_kernels.bench.runner import add_arguments as add_bench_arguments
    add_bench_arguments(bench, sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    return {"info": cmd_info, "bench": cmd_bench}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
