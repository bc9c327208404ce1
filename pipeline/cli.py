"""Command line: `tgs <command> ...` (the same as `python -m pipeline <command> ...`). It only
parses and calls.

Heavy imports (torch, timm, kaggle) happen inside the command functions, so `--help`,
`score` and `rle` start fast. Every `PipelineError` becomes one line on stderr and exit
code 2; argparse's own errors are one line too. Ctrl-C and SIGTERM stop a command the same way
(pipeline/stopping.py): one line naming the command that resumes it, exit 130 or 143. A command
acting on a run (train, all, branch, tune, predict, submit, show) appends what it prints to the
run's log.txt (pipeline/runlog.py), the line and exit status of a stopped one included.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.stopping import exit_code, stop_on_signals, stopped_line

DEFAULT_CONFIG = "configs/cpu_quick.yaml"


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, where it has one worth showing (not None,
    False or []) and its help does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or "default" in text or default in (None, False, argparse.SUPPRESS)
                or default == [] or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def _config_args(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument("--config", required=required, help="YAML config (see configs/)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=3 (repeatable)",
    )


def _folds_arg(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fold numbers, got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _seed(text: str) -> int:
    # numpy's and sklearn's seeds: outside this range they raise a ValueError traceback
    value = _positive_int(text)
    if value > 2**32 - 1:
        raise argparse.ArgumentTypeError(f"expected a seed in 0..{2**32 - 1}, got {text!r}")
    return value


def _image_count(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_SYNTH_IMAGES:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_SYNTH_IMAGES} images (TGS has 22000), got {text!r}")
    return value


FOLDS_RULE = ("Folds file: the config's folds_csv, else folds/<data folder name>-k<n_folds>-s<seed>.csv "
              "(made on first use; `tgs folds --data DIR --k K --seed S` writes the same path).")
MAX_SYNTH_IMAGES = 100_000  # synth holds every image in memory while it draws them (~0.1 MB each)


# ---------------------------------------------------------------- commands


def cmd_synth(args: argparse.Namespace) -> int:
    from pipeline.synth import generate

    generate(args.out, n_train=args.n_train, n_test=args.n_test, seed=args.seed)
    print(f"wrote synthetic dataset to {args.out} ({args.n_train} train, {args.n_test} test)")
    return 0


def cmd_folds(args: argparse.Namespace) -> int:
    from pipeline.folds import fold_summary, make_folds_for_dir

    from pipeline.config import default_folds_csv

    out = args.out or default_folds_csv(args.data, args.k, args.seed)
    folds = make_folds_for_dir(args.data, k=args.k, seed=args.seed, out=out)
    print(fold_summary(folds))
    print(f"wrote {out}")
    return 0


def cmd_rle_encode(args: argparse.Namespace) -> int:
    from pipeline.data import encode_mask_dir

    count = encode_mask_dir(args.masks, args.out)
    print(f"encoded {count} masks to {args.out}")
    return 0


def cmd_rle_decode(args: argparse.Namespace) -> int:
    from pipeline.data import decode_csv_to_dir

    count = decode_csv_to_dir(args.csv, args.out)
    print(f"decoded {count} masks to {args.out}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from pipeline.metric import score_csvs

    score, count = score_csvs(args.truth, args.pred)
    print(f"score {score:.4f} over {count} images")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.config import check_folds, load_config

    cfg = load_config(args.config, args.overrides)  # a bad config is refused before torch is imported
    if args.data is not None:
        cfg.data = args.data
    from pipeline.train_folds import train_folds

    if args.folds is not None:
        # before anything is written: a fold outside n_folds would land in the run's config.yaml
        check_folds(args.folds, cfg.n_folds, "--folds")
        cfg.folds = args.folds
    train_folds(cfg, resume=not args.restart, force=args.force, parallel_folds=args.parallel_folds,
                fold_worker=args.fold_worker, predict_test=args.predict_test)
    return 0


def cmd_branch(args: argparse.Namespace) -> int:
    from pipeline.branch import branch_run
    from pipeline.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.data is not None:
        cfg.data = args.data
    written = branch_run(cfg, args.source)
    print(f"{cfg.run_dir}: {len(written)} fold(s) start at the end of {args.source}'s stage 1; "
          "train it with the same --config/--set (pipeline train or all)")
    return 0


def cmd_all(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.run_all import run_all

    cfg = load_config(args.config, args.overrides)
    run_all(cfg, args.data, force=args.force, submission=args.submission)
    return 0


def cmd_blend(args: argparse.Namespace) -> int:
    from pipeline.blend import blend_runs

    path = blend_runs(args.runs, args.name, weights=args.weights, runs_dir=args.runs_dir, data_dir=args.data,
                      force=args.force, submission=args.submission)
    print(f"wrote {path}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from pipeline.tune import tune_run

    tune_run(args.run)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from pipeline.predict import predict_run

    predict_run(args.run, data_dir=args.data, tta=args.tta, device=args.device)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from pipeline.submit import submit_run

    path = submit_run(args.run, out=args.out, data_dir=args.data)
    print(f"wrote {path}")
    return 0


def cmd_check_submission(args: argparse.Namespace) -> int:
    from pipeline.submit import check_submission

    count = check_submission(args.csv, args.test)
    print(f"{args.csv}: valid submission, {count} rows")
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from pipeline.leaderboard import diff_runs, format_leaderboard

    if args.diff:
        print(diff_runs(args.diff[0], args.diff[1], runs_dir=args.runs_dir))
    else:
        print(format_leaderboard(args.file, top=args.top, data=args.data))
        from pipeline.leaderboardpage import write_leaderboard_page

        page = write_leaderboard_page(args.file, runs_dir=args.runs_dir)
        if page is not None:
            print(f"page: {page}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from pipeline.show import show_run

    for path in show_run(args.run, data_dir=args.data):
        print(path)
    return 0


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from pipeline import __version__
    from pipeline.rundir import LEADERBOARD_CSV

    parser = _Parser(prog="tgs", description="TGS Salt pipeline: data -> folds -> k-fold UNets -> OOF tuning -> TTA -> "
                     "submission. `tgs COMMAND --help` describes a command and its options.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="command")

    p = sub.add_parser("synth", help="write a synthetic seismic-like dataset in the competition layout")
    p.add_argument("--out", required=True, help="output folder (train/, test/, train.csv, depths.csv)")
    p.add_argument("--n-train", type=_image_count, default=800, help="training images (with masks) to draw")
    p.add_argument("--n-test", type=_image_count, default=200, help="test images to draw")
    p.add_argument("--seed", type=_seed, default=0, help="random seed: the same seed draws the same images")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("folds", help="stratified k-fold split by salt-coverage class",
                       description="Stratified k-fold split by salt-coverage class. " + FOLDS_RULE)
    p.add_argument("--data", required=True, help="dataset folder (train/masks or train.csv)")
    p.add_argument("--k", type=_positive_int, default=5, help="number of folds (a config's n_folds)")
    p.add_argument("--seed", type=_seed, default=42, help="shuffling seed (a config's seed)")
    p.add_argument("--out", default=None, help="the CSV to write (default: folds/<data folder name>-k<K>-s<SEED>.csv, "
                   "the file train and all read for that data, k and seed)")
    p.set_defaults(func=cmd_folds)

    p = sub.add_parser("rle", help="encode mask PNGs to an id,rle_mask CSV or decode one")
    rle_sub = p.add_subparsers(dest="rle_command", required=True, parser_class=_Parser, metavar="encode|decode")
    q = rle_sub.add_parser("encode", help="mask PNGs -> id,rle_mask CSV")
    q.add_argument("--masks", required=True, help="folder of mask PNGs (<id>.png)")
    q.add_argument("--out", required=True, help="the CSV to write")
    q.set_defaults(func=cmd_rle_encode)
    q = rle_sub.add_parser("decode", help="id,rle_mask CSV -> mask PNGs")
    q.add_argument("--csv", required=True, help="an id,rle_mask CSV (train.csv or a submission)")
    q.add_argument("--out", required=True, help="folder for the mask PNGs (<id>.png)")
    q.set_defaults(func=cmd_rle_decode)

    p = sub.add_parser("score", help="competition score of a prediction CSV against a truth CSV")
    p.add_argument("--truth", required=True, help="id,rle_mask CSV of the true masks (e.g. train.csv)")
    p.add_argument("--pred", required=True, help="id,rle_mask CSV of the predicted masks, the same ids")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("train", help="train the config's folds (resumes from last.pt by default)",
                       description="Train the config's folds into runs/<name>/ (resumes from last.pt by default). "
                       + FOLDS_RULE)
    _config_args(p)
    p.add_argument("--data", default=None, help="dataset folder in the Kaggle layout (default: the config's data)")
    p.add_argument("--folds", type=_folds_arg, default=None, help="e.g. 0,1 (default: the config's)")
    p.add_argument("--restart", action="store_true", help="ignore last.pt and start the folds afresh")
    p.add_argument("--force", action="store_true", help="retrain folds that are already complete")
    p.add_argument("--parallel-folds", action="store_true", help="train folds concurrently")
    p.add_argument("--fold-worker", action="store_true", help=argparse.SUPPRESS)  # set by --parallel-folds
    p.add_argument("--predict-test", action="store_true",
                   help="each fold also predicts the test set of the config's data folder when it finishes "
                        "(as `all` does), so `predict` only averages the folds' files")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("branch", help="start a run from another run's end of stage 1 (stage-2 variants)")
    _config_args(p)
    p.add_argument("--from", dest="source", required=True, help="the source run folder, trained with "
                   "run.keep_stage1: true")
    p.add_argument("--data", default=None, help="dataset folder, as given to `all` (default: the config's)")
    p.set_defaults(func=cmd_branch)

    p = sub.add_parser("all", help="end to end: folds, train, tune, predict, submit, show, leaderboard",
                       description="End to end: folds, train, tune, predict, submit, show (pictures: "
                       "runs/<name>/show/index.html), leaderboard (runs/index.html); each stage skipped when "
                       "its output is up to date. " + FOLDS_RULE)
    _config_args(p)
    p.add_argument("--data", default=None, help="dataset folder in the Kaggle layout (default: the config's)")
    p.add_argument("--force", action="store_true", help="recompute every stage")
    p.add_argument("--submission", default=None, help="submission path (default: submissions/<name>.csv)")
    p.set_defaults(func=cmd_all)

    p = sub.add_parser("blend", help="weighted mean of runs' OOF and test probabilities, tuned and submitted as a run")
    p.add_argument("--runs", nargs="+", required=True, help="run folders on the same folds, e.g. runs/a runs/b")
    p.add_argument("--name", required=True, help="the blend's run name: writes <runs-dir>/NAME and submissions/NAME.csv")
    p.add_argument("--weights", default="auto", help="'auto' (searched on the OOF, nested; default) or e.g. 1,2")
    p.add_argument("--runs-dir", default="runs", help="folder holding the runs; the blend is written into it")
    p.add_argument("--data", default=None, help="dataset folder with test/images (default: the first run's)")
    p.add_argument("--force", action="store_true", help="remake the blend (also one of other runs under NAME)")
    p.add_argument("--submission", default=None, help="submission path (default: submissions/NAME.csv)")
    p.set_defaults(func=cmd_blend)

    p = sub.add_parser("tune", help="search threshold and min area on the out-of-fold predictions")
    p.add_argument("--run", required=True, help="run dir, e.g. runs/cpu_quick")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("predict", help="fold-averaged TTA probabilities for the test images")
    p.add_argument("--run", required=True, help="run dir, e.g. runs/cpu_best")
    p.add_argument("--data", default=None, help="dataset folder with test/images (default: the run's)")
    p.add_argument("--tta", default=None, help="comma list from none,hflip,vflip,hvflip (default: config's)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("submit", help="threshold, RLE-encode and write submissions/<run>.csv")
    p.add_argument("--run", required=True, help="run dir, tuned and predicted, e.g. runs/cpu_best")
    p.add_argument("--out", default=None, help="default: submissions/<run name>.csv")
    p.add_argument("--data", default=None, help="dataset folder with test/images (default: the run's)")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("check-submission", help="validate a submission CSV against a test image folder")
    p.add_argument("--csv", required=True, help="the submission CSV (id,rle_mask)")
    p.add_argument("--test", required=True, help="dataset folder (with test/images) or the images folder")
    p.set_defaults(func=cmd_check_submission)

    p = sub.add_parser("leaderboard", help="rank every tuned run by CV, within its dataset; write runs/index.html",
                       description="Rank every tuned run by tuned CV within its dataset (scores on different data "
                       "are not comparable), and write the page <runs-dir>/index.html: every run ranked, links to "
                       "each run's pictures, tuned CV against training minutes.")
    p.add_argument("--file", default=LEADERBOARD_CSV, help="the leaderboard CSV (tune adds each run's row)")
    p.add_argument("--top", type=_positive_int, default=0, help="show only the best N of each dataset (0: all)")
    p.add_argument("--data", default=None, help="only runs on this dataset: its folder name or path (e.g. tgs or data/tgs)")
    p.add_argument("--diff", nargs=2, metavar=("RUN_A", "RUN_B"), help="config keys in which two runs differ; each a run's name in --runs-dir or a path to its "
                   "folder")
    p.add_argument("--runs-dir", default="runs", help="folder holding the runs (for --diff and the page)")
    p.set_defaults(func=cmd_leaderboard)

    p = sub.add_parser("show", help="PNG grids: worst OOF predictions, test samples, training curves")
    p.add_argument("--run", required=True, help="run dir, e.g. runs/cpu_best")
    p.add_argument("--data", default=None, help="dataset folder the run trained on (default: the run's config's data)")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("kaggle", help="download, submit, and build/push the Kaggle kernel")
    _add_kaggle_commands(p)  # each sub-command sets its own func
    return parser


def _add_kaggle_commands(parser: argparse.ArgumentParser) -> None:
    from pipeline.kaggle.commands import add_commands  # argparse only: --help stays fast

    add_commands(parser, parser_class=_Parser, config_args=_config_args)


RUN_COMMANDS_BY_CONFIG = ("train", "all", "branch")


def run_dir_of(args: argparse.Namespace) -> Path | None:
    """The run folder a command acts on (for its log.txt), or None."""
    if getattr(args, "fold_worker", False):  # its parent logs the lines it echoes
        return None
    if args.command in RUN_COMMANDS_BY_CONFIG:
        from pipeline.config import load_config

        try:
            return load_config(args.config, args.overrides).run_dir
        except PipelineError:
            return None  # the command itself reports the bad config
    run = getattr(args, "run", None)
    return Path(run) if run else None


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no version check over the network
    argv = sys.argv[1:] if argv is None else list(argv)
    with stop_on_signals():  # SIGTERM stops a command as Ctrl-C does (pipeline/stopping.py)
        try:
            return _parse_and_call(argv)
        except KeyboardInterrupt as exc:  # came before or after the command itself (start-up, the log's frame)
            return _stopped(exc, argv)


def _parse_and_call(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    run_dir = run_dir_of(args)
    if run_dir is None:
        return _call(args, argv)
    from pipeline.runlog import run_log

    with run_log(run_dir, argv) as log:
        code = _call(args, argv)
        if log is not None:
            log.exit_code = code
    return code


def _call(args: argparse.Namespace, argv: list[str]) -> int:
    try:
        return int(args.func(args) or 0)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM as errors.Terminated
        return _stopped(exc, argv)
    except BrokenPipeError:
        # the reader went away (`pipeline leaderboard | head`): stop quietly, as Unix tools do;
        # stdout is pointed at /dev/null so the interpreter's final flush cannot raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _stopped(exc: KeyboardInterrupt, argv: list[str]) -> int:
    """One line (the signal, the command that resumes), and the shell's status for it. Under
    torchrun, which signals every rank, rank 0 says it for all."""
    from pipeline.runlog import is_secondary_process

    if not is_secondary_process():
        print(stopped_line(exc, argv, fold_process="--fold-worker" in argv), file=sys.stderr)
    return exit_code(exc)


if __name__ == "__main__":
    raise SystemExit(main())
