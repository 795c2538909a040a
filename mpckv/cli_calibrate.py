"""Calibration subcommands: ``calibrate razorattention``, ``train-gates trimkv``, ``train-bias nosa``.

Examples
--------
::

    mpckv calibrate razorattention --model tiny --out heads.json
    mpckv generate --model tiny --method razorattention --param heads=heads.json --budget 0.2 --prompt "…"
    mpckv train-gates trimkv --model tiny --out gates.safetensors --minutes 5
    mpckv train-bias nosa --model tiny --out nosa_bias.safetensors
    mpckv calibrate a2ats --model tiny --out a2ats.safetensors   # A²ATS key codebooks (shipped for tiny)
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any


def _threads(n: int) -> None:
    import torch

    if n > 0:
        torch.set_num_threads(n)


def cmd_calibrate_a2ats(args: argparse.Namespace) -> int:
    """Fit A²ATS query-weighted key codebooks and write them as safetensors."""
    from mpckv.calibrate.a2ats import A2atsCalibration, run

    _threads(args.threads)
    cal = A2atsCalibration(
        codewords=args.codewords,
        seq_len=args.calib_seq_len,
        sequences=max(1, args.calib_tokens // args.calib_seq_len),
        offset=args.offset or None,
        iters=args.iters,
        seed=args.seed,
    )
    print(json.dumps(run(args.model, cal, args.out)))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Identify retrieval heads (RazorAttention) and write them as JSON."""
    if args.method == "a2ats":
        return cmd_calibrate_a2ats(args)
    from mpckv.calibrate import model_label
    from mpckv.calibrate.razor import RazorCalibration, calibrate, save
    from mpckv.checkpoint import load_model

    _threads(args.threads)
    cal = RazorCalibration(
        seg_len=args.seg_len,
        repeats=args.repeats,
        num_sequences=args.sequences,
        induction_ratio=args.induction_ratio,
        echo_ratio=args.echo_ratio,
        seed=args.seed,
    )
    t0 = time.perf_counter()
    model = load_model(args.model)
    record = calibrate(model, cal, model_label(args.model))
    record["seconds"] = round(time.perf_counter() - t0, 2)
    save(record, args.out)
    heads = record["retrieval_heads"]
    print(json.dumps({"out": args.out, "retrieval_heads": heads, "seconds": record["seconds"]}))
    return 0


def cmd_train_gates(args: argparse.Namespace) -> int:
    """Train TRIM-KV retention gates by gate-only distillation and write them as safetensors."""
    from mpckv.calibrate import model_label
    from mpckv.calibrate.trimkv_gates import GateTraining, train_gates
    from mpckv.checkpoint import load_model

    _threads(args.threads)
    cfg = GateTraining(
        memory=args.memory,
        seq_len=args.seq_len,
        steps=args.steps,
        minutes=args.minutes,
        lr=args.lr,
        capacity_weight=args.capacity_weight,
        hidden=args.hidden,
        batch=args.batch,
        seed=args.seed,
    )
    model = load_model(args.model)
    encode = None
    if model.config.vocab_size != 256:
        from mpckv.tokenizer import load_tokenizer

        encode = load_tokenizer(model.source or args.model, model.config.vocab_size).encode
    info = train_gates(model, cfg, args.out, model_label(args.model), encode)
    print(json.dumps(info))
    return 0


def cmd_train_bias(args: argparse.Namespace) -> int:
    """Fit NOSA's query-agnostic bias head on a frozen model and write it as safetensors."""
    from mpckv.calibrate import model_label
    from mpckv.calibrate.nosa_bias import BiasTraining, train_bias
    from mpckv.checkpoint import load_model

    _threads(args.threads)
    cfg = BiasTraining(
        seq_len=args.seq_len, sequences=args.sequences, steps=args.steps, lr=args.lr, seed=args.seed
    )
    model = load_model(args.model)
    encode = None
    if model.config.vocab_size != 256:
        from mpckv.tokenizer import load_tokenizer

        encode = load_tokenizer(model.source or args.model, model.config.vocab_size).encode
    print(json.dumps(train_bias(model, cfg, args.out, model_label(args.model), encode)))
    return 0


def add_calibrate_commands(sub: Any) -> None:
    """Register ``calibrate`` and ``train-gates`` on the top-level subparsers."""
    p = sub.add_parser(
        "calibrate", help="offline calibration of a KV method", description=cmd_calibrate.__doc__
    )
    p.add_argument("method", choices=["razorattention", "a2ats"])
    p.add_argument(
        "--model", default="tiny", metavar="PATH", help="checkpoint, 'tiny' or an installable name"
    )
    p.add_argument("--out", required=True, metavar="FILE", help="file to write (JSON; a2ats: safetensors)")
    p.add_argument("--seg-len", type=int, default=256, help="random segment length (paper: 2500)")
    p.add_argument("--repeats", type=int, default=4, help="segment repetitions (paper: 4)")
    p.add_argument("--sequences", type=int, default=2, help="calibration sequences averaged")
    p.add_argument("--induction-ratio", type=float, default=0.14)
    p.add_argument("--echo-ratio", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    g = p.add_argument_group("a2ats")
    g.add_argument("--codewords", type=int, default=256, help="a2ats: codewords per KV head (paper: 4096)")
    g.add_argument("--calib-tokens", type=int, default=8192, help="a2ats: calibration tokens in all")
    g.add_argument("--calib-seq-len", type=int, default=1024, help="a2ats: tokens per calibration sequence")
    g.add_argument("--iters", type=int, default=20, help="a2ats: Lloyd iterations after k-means++")
    g.add_argument("--offset", type=int, default=0, help="a2ats: WRoPE offset w (0 = min(2048, max_pos/4))")
    p.set_defaults(handler=cmd_calibrate)

    p = sub.add_parser(
        "train-gates", help="train learned gates of a KV method", description=cmd_train_gates.__doc__
    )
    p.add_argument("method", choices=["trimkv"])
    p.add_argument(
        "--model", default="tiny", metavar="PATH", help="checkpoint, 'tiny' or an installable name"
    )
    p.add_argument("--out", required=True, metavar="FILE", help="safetensors file to write")
    p.add_argument("--memory", type=int, default=128, help="target kept entries M (capacity loss)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--minutes", type=float, default=8.0, help="stop after this many minutes")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--capacity-weight", type=float, default=1.0)
    p.add_argument("--hidden", type=int, default=64, help="gate hidden width")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    p.set_defaults(handler=cmd_train_gates)

    p = sub.add_parser(
        "train-bias", help="fit the learned token bias of a KV method", description=cmd_train_bias.__doc__
    )
    p.add_argument("method", choices=["nosa"])
    p.add_argument(
        "--model", default="tiny", metavar="PATH", help="checkpoint, 'tiny' or an installable name"
    )
    p.add_argument("--out", required=True, metavar="FILE", help="safetensors file to write")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per training sequence")
    p.add_argument("--sequences", type=int, default=16)
    p.add_argument("--steps", type=int, default=300, help="Adam steps per layer")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    p.set_defaults(handler=cmd_train_bias)
