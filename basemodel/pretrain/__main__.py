"""``python -m basemodel.pretrain --output DIR [--minutes N] [--seed S]``.

The same as ``loraswap model pretrain-tiny``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", type=Path, required=True, help="target diffusers folder")
    parser.add_argument("--minutes", type=float, default=None, help="wall-clock budget (default 30)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=None, help="fixed VAE steps (overrides --minutes)")
    parser.add_argument("--unet-steps", type=int, default=None, help="fixed UNet steps (overrides --minutes)")
    parser.add_argument(
        "--snapshot-every", type=int, default=None, help="also save OUTPUT.snapshot every N UNet steps"
    )
    parser.add_argument(
        "--resume",
        type=Path,
        default=None,
        help="keep this pretrained folder's VAE; continue its UNet + text encoder",
    )
    parser.add_argument(
        "--vae-from",
        type=Path,
        default=None,
        help="take this pretrained folder's VAE; train a fresh UNet + text encoder",
    )
    parser.add_argument(
        "--noise-offset",
        type=float,
        default=0.0,
        help="add N * randn(batch, channels, 1, 1) to the noise (kohya's --noise_offset)",
    )
    parser.add_argument(
        "--edge-weight",
        type=float,
        default=0.0,
        help="up-weight the loss on latent pixels along each shape's outline by 1 + W",
    )
    parser.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop the UNet stage after N steps (the LR schedule still spans --unet-steps)",
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="peak UNet and text-encoder learning rate")
    parser.add_argument(
        "--text-lr", type=float, default=None, help="peak text-encoder learning rate (default --lr)"
    )
    parser.add_argument(
        "--high-noise-weight", type=float, default=None, help="weight high-noise steps by min(1 + 1/SNR, W)"
    )
    parser.add_argument("--batch", type=int, default=32, help="VAE and UNet batch size")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared CPU)"
    )
    parser.add_argument(
        "--device", default="cpu", help="cpu or cuda[:N]; data and noise are drawn on the CPU either way"
    )
    parser.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="every N UNet steps, score the 48-prompt set (seeds 100, 101) into OUTPUT.evals.jsonl and "
        "keep the best-scoring pipeline as OUTPUT.best",
    )
    parser.add_argument(
        "--evals", type=int, default=None, help="like --eval-every, but N evaluations spread over the run"
    )


def run(args: argparse.Namespace) -> int:
    import torch  # here, not at import: `loraswap --help` builds this parser

    from basemodel.pretrain.train import Recipe, pretrain

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    minutes = args.minutes
    if args.resume or args.vae_from:
        args.vae_steps = 0
    if minutes is None and (args.vae_steps is None or args.unet_steps is None):
        minutes = 30.0
    recipe = Recipe(
        seed=args.seed,
        minutes=minutes,
        vae_steps=args.vae_steps,
        unet_steps=args.unet_steps,
        vae_batch=args.batch,
        unet_batch=args.batch,
        threads=args.threads,
        unet_lr=args.lr,
        text_lr=args.text_lr or args.lr,
        resume=str(args.resume) if args.resume else None,
        high_noise_weight=args.high_noise_weight,
        noise_offset=args.noise_offset,
        edge_weight=args.edge_weight,
        stop_after=args.stop_after,
        vae_from=str(args.vae_from) if args.vae_from else None,
        device=args.device,
        eval_every=args.eval_every,
        evals=args.evals,
    )
    argv = sys.argv[1:]
    if "pretrain-tiny" in argv:  # called as `loraswap model pretrain-tiny …`
        argv = argv[argv.index("pretrain-tiny") + 1 :]
    command = shlex.join(["loraswap", "model", "pretrain-tiny", *argv])
    out = pretrain(args.output, recipe, command=command, snapshot_every=args.snapshot_every)
    print(f"pretrained tiny-sd at {out} (vae {recipe.vae_steps} steps, unet {recipe.unet_steps} steps)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m basemodel.pretrain", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
