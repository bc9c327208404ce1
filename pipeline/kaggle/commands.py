"""`python -m pipeline kaggle ...`: the sub-commands' arguments and the small functions they
call (`set_defaults(func=...)`). pipeline/cli.py builds the top-level parser and delegates
here; the work happens in the sibling modules, imported only when a command runs.
"""

from __future__ import annotations

import argparse
from typing import Callable

KERNEL_DIR = "kernels/train"


# ---------------------------------------------------------------- commands


def cmd_download(args: argparse.Namespace) -> int:
    from pipeline.kaggle.dataset import download

    download(args.out)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from pipeline.kaggle.submission import submit

    submit(args.csv, args.message, args.test)
    return 0


def cmd_kernel_build(args: argparse.Namespace) -> int:
    from pipeline.kaggle.kernel import KERNEL_FILE, METADATA_FILE, build_kernel

    out = build_kernel(args.config, args.overrides, args.user, args.slug, args.out, args.gpu, args.pseudo_round,
                       internet=args.internet, weights_dataset=args.weights_dataset)
    print(f"wrote {out / METADATA_FILE} and {out / KERNEL_FILE} ({args.user}/{args.slug}); "
          f"next: python -m pipeline kaggle kernel push --dir {out}")
    return 0


def cmd_kernel_push(args: argparse.Namespace) -> int:
    from pipeline.kaggle.kernel import push_kernel

    kernel_id = push_kernel(args.dir)
    print(f"pushed {kernel_id}; follow it with: python -m pipeline kaggle kernel status --dir {args.dir}")
    return 0


def cmd_kernel_status(args: argparse.Namespace) -> int:
    from pipeline.kaggle.kernel import kernel_status

    if kernel_status(args.dir) == "complete":
        print(f"next: python -m pipeline kaggle kernel output --dir {args.dir}")
    return 0


def cmd_kernel_output(args: argparse.Namespace) -> int:
    from pipeline.kaggle.kernel import kernel_output

    submission = kernel_output(args.dir, args.out)
    print(f"submission: {submission}; submit it with: python -m pipeline kaggle submit "
          f"--csv {submission} -m \"kernel run\"")
    return 0


def cmd_weights_dataset(args: argparse.Namespace) -> int:
    from pipeline.kaggle.weights import default_slug, make_weights_dataset

    path = make_weights_dataset(args.encoder, args.out, args.user, args.slug, args.weights, args.push)
    dataset_id = f"{args.user}/{args.slug or default_slug(args.encoder)}"
    print(f"wrote {path} and {path.parent / 'dataset-metadata.json'} ({dataset_id}); "
          f"offline, use it as --set model.weights_path={path.parent}")
    if args.push:
        print(f"created {dataset_id}; train from it with: python -m pipeline kaggle kernel build "
              f"--config CFG --user {args.user} --weights-dataset {dataset_id}")
    else:
        print(f"next: the same with --push (kaggle datasets create -p {path.parent})")
    return 0


# ---------------------------------------------------------------- parser


def add_commands(parser: argparse.ArgumentParser, *, parser_class: type[argparse.ArgumentParser],
                 config_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """The `kaggle` sub-commands under `parser`; parser_class and config_args are pipeline/cli.py's
    (one-line argparse errors, --config/--set) so every command reads the same."""
    sub = parser.add_subparsers(dest="kaggle_command", required=True, parser_class=parser_class, metavar="command")
    p = sub.add_parser("download", help="download and unpack the competition data, then verify it")
    p.add_argument("--out", required=True, help="folder for the data (Kaggle layout), e.g. data/tgs")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("submit", help="check a submission CSV, then submit it to the competition")
    p.add_argument("--csv", required=True, help="the submission CSV (id,rle_mask)")
    p.add_argument("-m", "--message", required=True, help="the submission's description on Kaggle")
    p.add_argument("--test", default=None, help="test folder to check against (default: skip id check)")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("kernel", help="render, push and follow the training kernel")
    ksub = p.add_subparsers(dest="kernel_command", required=True, parser_class=parser_class, metavar="command")
    q = ksub.add_parser("build", help="render kernels/<purpose>/ with the pipeline bundled")
    config_args(q)
    q.add_argument("--user", required=True, help="your Kaggle user name")
    q.add_argument("--slug", default="tgs-salt-pipeline-train", help="the kernel's slug on Kaggle")
    q.add_argument("--out", default=KERNEL_DIR, help="folder for the rendered kernel")
    q.add_argument("--gpu", default="NvidiaTeslaT4", help="machine_shape: NvidiaTeslaT4 (T4 x2, the default) or "
                   "NvidiaL4; not NvidiaTeslaP100 (Kaggle's torch has no sm_60 kernels)")
    q.add_argument("--pseudo-round", action="store_true",
                   help="after the run, train it again on its confident test labels (pseudo.teacher); "
                        "that second run writes submission.csv")
    q.add_argument("--internet", action="store_true",
                   help="let the kernel use the internet (timm downloads a pretrained encoder's weights there)")
    q.add_argument("--weights-dataset", default=None, metavar="OWNER/SLUG",
                   help="a Kaggle dataset with the encoder's weights (see `kaggle weights-dataset`): mounted "
                        "as a data source and used as model.weights_path (sets model.pretrained)")
    q.set_defaults(func=cmd_kernel_build)

    q = ksub.add_parser("push", help="kaggle kernels push -p on the rendered folder")
    q.add_argument("--dir", default=KERNEL_DIR, help="the rendered kernel folder (kernel build --out)")
    q.set_defaults(func=cmd_kernel_push)

    q = ksub.add_parser("status", help="kaggle kernels status of the rendered kernel")
    q.add_argument("--dir", default=KERNEL_DIR, help="the rendered kernel folder (kernel build --out)")
    q.set_defaults(func=cmd_kernel_status)

    q = ksub.add_parser("output", help="fetch the kernel's output (its submission.csv)")
    q.add_argument("--dir", default=KERNEL_DIR, help="the rendered kernel folder (kernel build --out)")
    q.add_argument("--out", default="kernels/output", help="folder for the kernel's output files")
    q.set_defaults(func=cmd_kernel_output)

    p = sub.add_parser("weights-dataset", help="a Kaggle dataset with a timm encoder's ImageNet weights, for "
                       "kernels without internet")
    p.add_argument("--encoder", required=True, help="timm model name, e.g. resnet34 (as in model.name unet_resnet34)")
    p.add_argument("--out", required=True, help="folder for <encoder>.safetensors and dataset-metadata.json")
    p.add_argument("--user", required=True, help="your Kaggle user name (the dataset's owner)")
    p.add_argument("--slug", default=None, help="dataset slug (default: timm-<encoder>-imagenet)")
    p.add_argument("--weights", default=None, help="a local weights file or folder to use instead of "
                   "timm's download")
    p.add_argument("--push", action="store_true", help="then run `kaggle datasets create -p OUT`")
    p.set_defaults(func=cmd_weights_dataset)
