"""Command line: python -m truthgpt_kernels info | bench | train | generate | explain | report"""
import argparse
import os
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
    from truthgpt_kernels.explain import FAMILIES, kernel_path
    if tk.available_backends()["cpu"]["available"]:
        for fam in FAMILIES:
            rows.append((f"cpu {fam} (float32)", kernel_path(fam, "cpu", "cpu", torch.float32)))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def cmd_bench(args):
    from truthgpt_kernels.bench.runner import cli

    return cli(args)


def cmd_train(args):
    """Trains a model from a config on a text file or the embedded reversal task."""
    from truthgpt_kernels.config import ConfigError, TransformerConfig
    from truthgpt_kernels.train import train

    profile_steps, config_profile = 0, args.config_profile
    if args.profile is not None:
        if args.profile.isdigit():
            profile_steps = int(args.profile)
        elif config_profile is None:  # the former meaning of --profile: a profile in the config file
            print("note: --profile NAME is now --config-profile NAME (--profile STEPS profiles steps)",
                  file=sys.stderr)
            config_profile = args.profile
    overrides = {}
    if args.backend:
        overrides["backend"] = args.backend
    try:
        if args.config:
            config = TransformerConfig.load(args.config, profile=config_profile, **overrides)
        else:
            config = TransformerConfig.load(profile=config_profile, preset=args.preset, **overrides)
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
                          data=args.data, pack=not args.no_pack, n_digits=args.digits, seed=args.seed,
                          device=device,
                          autocast=args.autocast, out=args.out or (None if args.resume else "checkpoints/run"),
                          progress=not args.no_progress, parallel=args.parallel,
                          grad_accum=args.grad_accum, eval_every=args.eval_every,
                          save_every=args.save_every, resume=args.resume,
                          tensorboard=args.tensorboard, profile=profile_steps)
    except (ValueError, FileNotFoundError) as e:
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


def cmd_explain(args):
    """Backend and kernel path of each op a config's model would call, and why."""
    import torch

    from truthgpt_kernels.config import ConfigError
    from truthgpt_kernels.explain import explain

    from truthgpt_kernels.bench import canonical_dtype

    if not os.path.isfile(args.config):
        print(f"error: --config {args.config!r} is not a file", file=sys.stderr)
        return 2
    dtype = canonical_dtype(args.dtype) if args.dtype else None
    if args.dtype and dtype is None:
        print(f"error: --dtype {args.dtype!r} is not a float dtype; choose from float32 (fp32), "
              "bfloat16 (bf16), float16 (fp16), float64 (fp64)", file=sys.stderr)
        return 2
    try:
        result = explain(args.config, device=args.device, batch_size=args.batch_size, seq_len=args.seq_len,
                         dtype=getattr(torch, dtype) if dtype else None)
    except (ConfigError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        import json
        print(json.dumps(result.to_dicts(), indent=2))
    else:
        print(result)
    return 0


def cmd_report(args):
    """Loss and throughput curves of a training run (PNG) and a text summary."""
    from truthgpt_kernels.run_report import report

    try:
        text, png = report(args.run, png=args.png)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    print(f"plot: {png}" if png else "plot: skipped (matplotlib is not installed: pip install matplotlib)")
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
    train.add_argument("--config-profile", help="profile inside the config file")
    train.add_argument("--preset", default="tiny", help="preset when no --config is given")
    train.add_argument("--steps", type=int, default=300)
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--lr", type=float, default=5e-3)
    train.add_argument("--data", help="text file (byte-level tokens); default: reversal task")
    train.add_argument("--no-pack", action="store_true",
                       help="--data: plain windows that attend across documents (default: documents, "
                       "separated by blank lines, packed into rows without attention across them)")
    train.add_argument("--digits", type=int, default=4, help="reversal task: digits per example")
    train.add_argument("--out", help="run directory: checkpoint, metrics.jsonl, trace "
                       "(default: checkpoints/run, or the --resume directory)")
    train.add_argument("--device", default="cpu")
    train.add_argument("--backend", help="kernel backend (default: config / auto)")
    train.add_argument("--autocast", action="store_true", help="bfloat16 autocast")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--no-progress", action="store_true")
    train.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp",
                       help="under torchrun: DistributedDataParallel or FSDP2 (fully_shard)")
    train.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    train.add_argument("--eval-every", type=int, default=0, metavar="N", help="held-out evaluation every N steps")
    train.add_argument("--save-every", type=int, default=0, metavar="N",
                       help="resumable checkpoint every N steps (and at the end), written atomically")
    train.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    train.add_argument("--tensorboard", action="store_true",
                       help="also log to DIR/tensorboard (needs the tensorboard package)")
    train.add_argument("--profile", metavar="STEPS",
                       help="torch.profiler Chrome trace of STEPS steps (after the first) to DIR/trace.json")
    ex = sub.add_parser("explain", help="which backend and kernel path each op of a config would take, and why")
    ex.add_argument("--config", required=True, help="YAML/JSON config file")
    ex.add_argument("--device", default="cpu")
    ex.add_argument("--dtype", help="override the config's dtype (e.g. bfloat16 for autocast)")
    ex.add_argument("--batch-size", type=int, default=1)
    ex.add_argument("--seq-len", type=int, help="default: min(max_seq_len, 512)")
    ex.add_argument("--json", action="store_true")
    rep = sub.add_parser("report", help="loss/throughput curves (PNG) and a summary of a training run")
    rep.add_argument("run", help="run directory (holding metrics.jsonl)")
    rep.add_argument("--png", help="output image (default: RUN/report.png)")
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
    return {"info": cmd_info, "bench": cmd_bench, "train": cmd_train, "generate": cmd_generate,
            "explain": cmd_explain, "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
