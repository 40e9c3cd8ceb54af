"""Command line: python -m truthgpt_kernels info | bench | train | generate"""
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


def cmd_train(args):
    """Trains a model from a config on a text file or the embedded reversal task."""
    import os

    from truthgpt_kernels.config import ConfigError, TransformerConfig
    from truthgpt_kernels.train import train

    overrides = {}
    if args.backend:
        overrides["backend"] = args.backend
    try:
        if args.config:
            config = TransformerConfig.load(args.config, profile=args.profile, **overrides)
        else:
            config = TransformerConfig.load(profile=args.profile, preset=args.preset, **overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.data is not None and not os.path.isfile(args.data):
        print(f"error: --data {args.data!r} is not a file", file=sys.stderr)
        return 2
    device, rank = args.device, 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun
        import torch
        import torch.distributed as dist
        cuda = args.device.startswith("cuda")
        dist.init_process_group("nccl" if cuda else "gloo")
        rank = dist.get_rank()
        if cuda:
            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
            torch.cuda.set_device(device)
    if rank == 0:
        print(f"model: {config.model_type}, {config.num_parameters() / 1e6:.2f}M parameters, "
              f"d_model {config.d_model}, {config.n_layers} layers; data: {args.data or 'reversal task'}")
    try:
        _, result = train(config, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                          data=args.data, n_digits=args.digits, seed=args.seed, device=device,
                          autocast=args.autocast, out=args.out, progress=not args.no_progress,
                          parallel=args.parallel)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rank != 0:
        return 0
    print(f"loss {result.first_loss:.3f} -> {result.final_loss:.3f} in {result.seconds:.1f}s "
          f"({result.tokens_per_s:.0f} tokens/s)")
    if result.eval:
        print("held-out: " + ", ".join(f"{k} {v:.3f}" for k, v in result.eval.items()))
    print(f"checkpoint: {result.checkpoint}")
    return 0


def cmd_generate(args):
    """Continues a prompt with a trained checkpoint (byte-level tokens)."""
    from truthgpt_kernels.train import checkpoint_info, generate_text, load_checkpoint

    try:
        model = load_checkpoint(args.checkpoint, device=args.device)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stop = args.stop
    if stop is None and checkpoint_info(args.checkpoint).get("task") == "reverse":
        stop = "."
    try:
        text = generate_text(model, args.prompt, args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, stop=stop, seed=args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(args.prompt + text)
    return 0


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
    train = sub.add_parser("train", help="train a model (text file or the embedded reversal task)")
    train.add_argument("--config", help="YAML/JSON config file (default: the tiny preset)")
    train.add_argument("--profile", help="profile inside the config file")
    train.add_argument("--preset", default="tiny", help="preset when no --config is given")
    train.add_argument("--steps", type=int, default=300)
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--lr", type=float, default=5e-3)
    train.add_argument("--data", help="text file (byte-level tokens); default: reversal task")
    train.add_argument("--digits", type=int, default=4, help="reversal task: digits per example")
    train.add_argument("--out", default="checkpoints/run", help="checkpoint directory")
    train.add_argument("--device", default="cpu")
    train.add_argument("--backend", help="kernel backend (default: config / auto)")
    train.add_argument("--autocast", action="store_true", help="bfloat16 autocast")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--no-progress", action="store_true")
    train.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp",
                       help="under torchrun: DistributedDataParallel or FSDP2 (fully_shard)")
    gen = sub.add_parser("generate", help="continue a prompt with a trained checkpoint")
    gen.add_argument("--checkpoint", required=True, help="directory written by train")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--stop", help="stop after this character (default '.' for the reversal task)")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return {"info": cmd_info, "bench": cmd_bench, "train": cmd_train,
            "generate": cmd_generate}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
