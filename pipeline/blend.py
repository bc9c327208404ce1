"""Blend runs: the weighted mean of several runs' OOF and test probabilities, made a run itself.

`python -m pipeline blend --runs runs/A runs/B --name AB [--weights auto|1,2]` checks that the
members were validated on the same folds (same folds file, same ids per fold, same test ids)
and that each one's predictions are complete and current, averages their probabilities (all
stored at 101x101, so pad- and resize-input runs and different models blend alike), and writes
`runs/AB/` in the layout of a trained run: config.yaml (the first member's, renamed),
fold<k>/{oof.npy, oof_ids.txt, done.json} holding the blended OOF, test_probs.npy,
test_ids.txt, predict.json and blend.json (members, weights, the search's report). Then the
ordinary `tune` (post-processing searched on the blended OOF, oof.csv, the leaderboard row,
which lists the members and weights), `submit` (checked) and `show` run on it unchanged.

Weights (`--weights auto`). Every weight vector on a coarse simplex grid (steps of 0.1 for two
or three members, coarser for more, plus exact equal weights) is scored by the competition
metric with its post-processing tuned, i.e. the best of tune's threshold x empty-threshold x
min-area grid. Picking the best of ~66 mixes x ~1400 rules on the same OOF flatters it, so:
  - the search is judged nested: for each fold, weights and rule are chosen on the other folds'
    OOF and scored on that fold; `cv_nested` (blend.json) is that honest CV, and
    `cv_nested_equal` the same for equal weights (only the rule chosen elsewhere);
  - the weights chosen on the whole OOF are used only when the nested search beats equal
    weights (cv_nested > cv_nested_equal); otherwise the blend keeps equal weights, the
    choice that needs no fitting. Among ties the mix nearest equal weights wins.
Given weights (`--weights 1,2`) are normalised to sum 1 and not searched; their cv_nested
is reported too. The tuned CV of tune.json is, as for every run, in-sample for the rule.

Reruns skip what is done: the blend is remade only when blend.json's digest of the members'
prediction files and the weight request differ, tune only when tune.json is not current (manifests.tune_is_current). Every
write is atomic (pipeline/fileio/atomic.py). blend.json is written first, marked unfinished and
naming the members, weights and data (what rundir.blend_command turns back into this command),
then the arrays (done.json after each fold's OOF), then blend.json again, finished: an
interrupted blend is redone, never half-used, and every stage that meets it (tune, predict,
submit, show, train, all) refuses in one line naming the blend command that finishes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import fileio
from pipeline.config import Config, check_number, check_plain_name, save_config
from pipeline.errors import PipelineError, short_repr
from pipeline.leaderboard import describe_members
from pipeline.manifests import (check_fold_files, check_predictions_current, finished_folds, fold_file_digests,
                                read_done_token, read_predict_meta, tune_is_current, write_predictions)
from pipeline.rundir import (BLEND_FILE, LEADERBOARD_CSV, OOF_FILES, FoldDir, RunDir, load_run_config,
                             read_blend_manifest, training_digest)

MAX_GRID_POINTS = 100  # weight vectors searched: each costs one tune grid per fold
GRID_STEPS = (10, 8, 5, 4, 2)  # 1/step is the weight resolution; the finest one under MAX_GRID_POINTS
TIE = 1e-9  # scores are means of tenths; closer than this is a tie


# ---------------------------------------------------------------- members


@dataclass
class Member:
    """A run to blend, its predictions checked complete and current."""

    run: Path
    cfg: Config
    fold_ids: dict[int, list[str]]  # fold -> its OOF ids, in oof_ids.txt's order
    test_ids: list[str]
    fold_seconds: dict[int, float]


def read_member(run_dir: str | Path) -> Member:
    """Check that the run's predictions exist and belong to its current training (one-line
    refusals otherwise); its arrays are read later, by `member_oof` / `member_test`."""
    from pipeline.submit import read_test_probs
    from pipeline.tune import read_fold_oof

    run = Path(run_dir)
    if not RunDir(run).config.is_file():
        raise PipelineError(f"{run}: not a run (no config.yaml)")
    cfg = load_run_config(run)
    finished_folds(cfg, run)  # every fold finished with the run's config (done.json): one line if not
    fold_ids: dict[int, list[str]] = {}
    fold_seconds: dict[int, float] = {}
    for fold in cfg.fold_list():
        # the OOF files are the ones the fold's done.json names (not a retrain's half-written ones)
        check_fold_files(run, fold, OOF_FILES)
        ids, _ = read_fold_oof(run, fold)  # shape, NaN: one line each
        fold_ids[fold] = ids
        fold_seconds[fold] = float(read_done_token(run, fold)[0].get("seconds", 0.0) or 0.0)
    # test_probs.npy and test_ids.txt are those predict.json names, predicted from these very folds
    check_predictions_current(cfg, run, read_predict_meta(run))
    test_ids, _ = read_test_probs(run)  # unreadable or inconsistent: one line
    return Member(run, cfg, fold_ids, test_ids, fold_seconds)


def check_members_agree(members: list[Member]) -> None:
    """Same folds file, same ids in every fold, same test ids as the first member; else one line
    naming the member and what differs."""
    first = members[0]
    for member in members[1:]:
        run, ref = member.run, first.run
        if member.cfg.n_folds != first.cfg.n_folds or member.cfg.fold_list() != first.cfg.fold_list():
            raise PipelineError(f"{run}: folds {member.cfg.fold_list()} of {member.cfg.n_folds}, but {ref} has "
                                f"{first.cfg.fold_list()} of {first.cfg.n_folds}")
        path, ref_path = member.cfg.folds_path(), first.cfg.folds_path()
        if path.is_file() and ref_path.is_file() and path.read_bytes() != ref_path.read_bytes():
            raise PipelineError(f"{run}: folds file {path} differs from {ref}'s {ref_path}")
        for fold, ids in member.fold_ids.items():
            differ = sorted(set(ids).symmetric_difference(first.fold_ids[fold]))
            if differ:
                raise PipelineError(f"{run}: fold {fold}'s OOF ids differ from {ref}'s in {len(differ)} ids "
                                    f"(e.g. {differ[0]}): not the same folds")
        differ = sorted(set(member.test_ids).symmetric_difference(first.test_ids))
        if differ:
            raise PipelineError(f"{run}: test ids differ from {ref}'s in {len(differ)} ids (e.g. {differ[0]})")


def member_digest(member: Member) -> str:
    """sha256 of every file the blend reads from the member: a changed prediction remakes the blend."""
    digest = hashlib.sha256()
    folders = [FoldDir.of(member.run, k) for k in member.cfg.fold_list()]
    files = [path for f in folders for path in (f.oof, f.oof_ids, f.done)]
    for path in files + [RunDir(member.run).probs, RunDir(member.run).ids]:
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def member_oof(member: Member, fold: int, ids: list[str]) -> np.ndarray:
    """float16 [n,101,101]: the member's OOF of `fold`, in the order of `ids`."""
    probs = np.load(FoldDir.of(member.run, fold).oof, allow_pickle=False)
    index = {image_id: i for i, image_id in enumerate(member.fold_ids[fold])}
    return probs[[index[i] for i in ids]].astype(np.float16)


def member_test(member: Member, ids: list[str]) -> np.ndarray:
    from pipeline.submit import read_test_probs

    member_ids, probs = read_test_probs(member.run)
    index = {image_id: i for i, image_id in enumerate(member_ids)}
    return probs[[index[i] for i in ids]].astype(np.float16)


# ---------------------------------------------------------------- weights


def parse_weights(text: str, n_members: int) -> np.ndarray | None:
    """None for "auto"; else the comma list normalised to sum 1."""
    if text.strip().lower() == "auto":
        return None
    try:
        weights = np.array([float(part) for part in text.split(",")], dtype=np.float64)
    except ValueError:
        raise PipelineError(f"--weights {short_repr(text)}: expected 'auto' or comma-separated numbers") from None
    if len(weights) != n_members:
        raise PipelineError(f"--weights {short_repr(text)}: {len(weights)} weights for {n_members} runs")
    if not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
        raise PipelineError(f"--weights {short_repr(text)}: weights must be non-negative, finite and not all 0")
    for weight in weights:  # 1e308,1e308 would sum to inf and normalise to 0,0
        check_number(f"--weights {short_repr(text)}", "weights[]", float(weight))
    return weights / weights.sum()


def simplex_grid(n_members: int) -> np.ndarray:
    """[W, M] weight vectors summing to 1: the finest step of GRID_STEPS with at most
    MAX_GRID_POINTS vectors, equal weights first (present even when 1/M is off the grid)."""
    equal = np.full((1, n_members), 1.0 / n_members)
    if n_members == 1:
        return equal
    for step in GRID_STEPS:
        if _n_compositions(step, n_members) <= MAX_GRID_POINTS:
            break
    points = [c for c in itertools.product(range(step + 1), repeat=n_members - 1) if sum(c) <= step]
    grid = np.array([[*c, step - sum(c)] for c in points], dtype=np.float64) / step
    grid = grid[~np.isclose(grid, equal).all(axis=1)]
    return np.concatenate([equal, grid])


def _n_compositions(step: int, n_members: int) -> int:
    from math import comb

    return comb(step + n_members - 1, n_members - 1)


def blend_probs(member_probs: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """float32 weighted sum of float16 arrays, member by member (no [M, N, H, W] copy)."""
    out = np.zeros(member_probs[0].shape, dtype=np.float32)
    for probs, weight in zip(member_probs, weights):
        if weight:
            out += np.float32(weight) * probs.astype(np.float32)
    return out


def fold_grids(truth: dict[int, np.ndarray], member_probs: dict[int, list[np.ndarray]], weight_grid: np.ndarray,
               cfg: Config) -> np.ndarray:
    """[W, K, T, E, A]: for each weight vector and fold, tune's score grid on that fold's blended
    OOF (-inf where tune does not search), the same grid and metric as `tune`."""
    from pipeline.metric import threshold_scores
    from pipeline.tune import search_grid, search_space

    thresholds, configured_empty, min_areas = search_grid(cfg)
    empty_thresholds, searched = search_space(thresholds, configured_empty)  # as tune_oof searches
    folds = sorted(truth)
    grids = np.empty((len(weight_grid), len(folds), len(thresholds), len(empty_thresholds), len(min_areas)))
    for w, weights in enumerate(weight_grid):
        for k, fold in enumerate(folds):
            grid = np.asarray(threshold_scores(truth[fold], blend_probs(member_probs[fold], weights), thresholds,
                                               min_areas, empty_thresholds=empty_thresholds), dtype=np.float64)
            grid[~searched] = -np.inf
            grids[w, k] = grid
    return grids


@dataclass(frozen=True)
class RuleAxes:
    """tune's grid axes, to turn a [T, E, A] grid's best cell into the rule tune would choose."""

    thresholds: list[float]
    empty_thresholds: list[float]
    min_areas: list[int]

    def best(self, grid: np.ndarray) -> tuple[int, int, int]:
        """Index (t, e, a) of the grid's maximum; ties as tune breaks them (nearest the defaults)."""
        from pipeline.tune import best_choice

        t, e, a = best_choice(grid, self.thresholds, self.empty_thresholds, self.min_areas)
        return self.thresholds.index(t), self.empty_thresholds.index(e), self.min_areas.index(a)


def rule_axes(cfg: Config) -> RuleAxes:
    from pipeline.tune import search_grid, search_space

    thresholds, configured_empty, min_areas = search_grid(cfg)
    empty_thresholds, _ = search_space(thresholds, configured_empty)
    return RuleAxes(thresholds, empty_thresholds, min_areas)


def pick(grid: np.ndarray, weight_grid: np.ndarray, axes: RuleAxes) -> tuple[int, tuple[int, int, int]]:
    """(weight index, (t, e, a)) of the best of a [W, T, E, A] grid; among tied mixes the one
    nearest equal weights (the mix that needs no fitting), among tied rules tune's own choice."""
    best_per_mix = grid.reshape(len(grid), -1).max(axis=1)
    ties = np.flatnonzero(best_per_mix >= best_per_mix.max() - TIE)
    equal = np.full(weight_grid.shape[1], 1.0 / weight_grid.shape[1])
    w = int(min(ties, key=lambda i: (round(float(np.abs(weight_grid[i] - equal).sum()), 9), i)))
    return w, axes.best(grid[w])


def nested_cv(grids: np.ndarray, fold_sizes: np.ndarray, weight_grid: np.ndarray,
              axes: RuleAxes) -> tuple[float, list[int]]:
    """(honest CV, the mix chosen for each fold): each fold scored with the weights and rule that
    were best on the other folds' OOF. grids [W, K, T, E, A] are per-fold mean scores."""
    n_folds = grids.shape[1]
    if n_folds < 2:
        raise PipelineError("a nested weight search needs at least 2 folds")
    scores, chosen = [], []
    for k in range(n_folds):
        others = [j for j in range(n_folds) if j != k]
        pooled = np.tensordot(grids[:, others], fold_sizes[others], axes=([1], [0])) / fold_sizes[others].sum()
        w, (t, e, a) = pick(pooled, weight_grid, axes)
        scores.append(grids[w, k, t, e, a])
        chosen.append(w)
    return float(np.dot(scores, fold_sizes) / fold_sizes.sum()), chosen


def search_weights(truth: dict[int, np.ndarray], member_probs: dict[int, list[np.ndarray]], cfg: Config,
                   weights: np.ndarray | None = None) -> dict[str, Any]:
    """The blend's weights and how honest they are (see the module docstring). weights given:
    only report them. truth[fold] bool [n,101,101]; member_probs[fold] one float16 array per member."""
    n_members = len(next(iter(member_probs.values())))
    candidates = simplex_grid(n_members) if weights is None else np.asarray(weights, np.float64)[None, :]
    grids = fold_grids(truth, member_probs, candidates, cfg)
    axes = rule_axes(cfg)
    sizes = np.array([len(truth[fold]) for fold in sorted(truth)], dtype=np.float64)
    pooled = np.tensordot(grids, sizes, axes=([1], [0])) / sizes.sum()  # [W, T, E, A] on the whole OOF
    best_w, _ = pick(pooled, candidates, axes)
    cv_nested, per_fold = nested_cv(grids, sizes, candidates, axes)
    report: dict[str, Any] = {
        "mode": "auto" if weights is None else "given",
        "n_candidates": len(candidates),
        "cv_nested": round(cv_nested, 6),
        "cv_in_sample": round(float(pooled[best_w].max()), 6),
    }
    if weights is None:
        cv_nested_equal, _ = nested_cv(grids[:1], sizes, candidates[:1], axes)
        searched_wins = cv_nested > cv_nested_equal + TIE
        chosen = best_w if searched_wins else 0
        report.update({
            "cv_nested_equal": round(cv_nested_equal, 6),
            "cv_equal": round(float(pooled[0].max()), 6),
            "cv_best_in_sample": round(float(pooled[best_w].max()), 6),
            "best_in_sample": [round(float(x), 4) for x in candidates[best_w]],
            "per_fold_choice": [[round(float(x), 4) for x in candidates[w]] for w in per_fold],
            "kept": "searched" if searched_wins else "equal (the search did not beat it nested)",
        })
        report["cv_in_sample"] = round(float(pooled[chosen].max()), 6)
        return {"weights": candidates[chosen], "report": report}
    return {"weights": candidates[0], "report": report}


# ---------------------------------------------------------------- the command


def _inputs_digest(members: list[Member], digests: list[str], weights_text: str, cfg: Config) -> str:
    import json

    from pipeline.config import flatten

    relevant = {"members": [str(m.run) for m in members], "digests": digests, "weights": weights_text.strip().lower(),
                "tune": {k: v for k, v in flatten(cfg).items() if k.startswith("tune.")}}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def _check_target(run: Path, members: list[Member], force: bool) -> None:
    """runs/NAME must be new, a partial blend, or this same blend (unless force)."""
    if any(run.resolve() == m.run.resolve() for m in members):
        raise PipelineError(f"{run}: is one of the runs to blend; choose another --name")
    if not run.exists():
        return
    trained = [p for p in run.glob("fold*/*") if p.suffix == ".pt" or p.name == "log.csv"]
    if trained and not (run / BLEND_FILE).exists():
        raise PipelineError(f"{run}: holds a trained run ({trained[0].relative_to(run)}), not a blend; "
                            "choose another --name")
    if (run / BLEND_FILE).exists() and not force:
        before = fileio.read_json(run / BLEND_FILE)
        previous = [m.get("run") for m in before.get("members", [])] if isinstance(before, dict) else []
        now = [str(m.run) for m in members]
        if previous != now:
            raise PipelineError(f"{run}: blends {', '.join(map(str, previous)) or '?'}, not {', '.join(now)}; "
                                "choose another --name, or --force to replace it")


def _is_fresh(output: Path, inputs: list[Path]) -> bool:
    return output.exists() and all(output.stat().st_mtime_ns >= p.stat().st_mtime_ns for p in inputs if p.exists())


def _blend_is_current(run: Path, digest: str, folds: list[int]) -> bool:
    folders = [FoldDir.of(run, k) for k in folds]
    needed = [path for f in folders for path in (f.oof, f.oof_ids, f.done)]
    needed += [RunDir(run).probs, RunDir(run).ids, RunDir(run).config]
    if not all(p.exists() for p in needed):
        return False
    saved = read_blend_manifest(run)  # None: no blend.json; {}: unreadable
    return bool(saved) and saved.get("inputs_digest") == digest and saved.get("finished") is not False


def _load_truth(cfg: Config, fold_ids: dict[int, list[str]]) -> dict[int, np.ndarray]:
    from pipeline.data import load_train

    all_ids = sorted(i for ids in fold_ids.values() for i in ids)
    train = load_train(cfg.data, all_ids)
    masks = dict(zip(train.ids, np.asarray(train.masks, dtype=bool)))
    return {fold: np.stack([masks[i] for i in ids]) for fold, ids in fold_ids.items()}


def make_blend(members: list[Member], run: Path, weights_text: str, digest: str,
               data_dir: str | Path | None = None) -> dict[str, Any]:
    """Search or take the weights, write the blended fold OOFs, test probabilities and blend.json.

    blend.json is written first, marked unfinished (`finished: false`, no inputs digest), with
    what makes the blend (members, weights asked for, --data: rundir.blend_command); then the
    arrays; then blend.json again, finished. A kill in between leaves a run that every stage
    refuses in one line naming the blend command, which remakes it (never current until then)."""
    first = members[0]
    cfg = dataclasses.replace(load_run_config(first.run), name=run.name, runs_dir=str(run.parent))
    fold_ids = {fold: sorted(ids) for fold, ids in first.fold_ids.items()}
    member_probs = {fold: [member_oof(m, fold, ids) for m in members] for fold, ids in fold_ids.items()}
    started = time.perf_counter()
    given = parse_weights(weights_text, len(members))
    if len(members) == 1:
        found = {"weights": np.ones(1), "report": {"mode": "single run"}}
    else:
        if given is None:
            print(f"  searching {len(simplex_grid(len(members)))} weight mixes x {len(fold_ids)} folds, "
                  "each with tune's post-processing grid", flush=True)
        found = search_weights(_load_truth(cfg, fold_ids), member_probs, cfg, given)
    weights = found["weights"]
    report = {**found["report"], "seconds": round(time.perf_counter() - started, 1)}

    blend = {
        "members": [{"run": str(m.run), "name": m.cfg.name, "weight": round(float(w), 6)}
                    for m, w in zip(members, weights)],
        "weights_requested": weights_text,
        "data": None if data_dir is None else str(data_dir),
        "search": report,
    }
    fileio.write_json(run / BLEND_FILE, {**blend, "finished": False})  # before anything it names
    save_config(cfg, RunDir(run).config)
    for fold, ids in fold_ids.items():
        folder = FoldDir.of(run, fold)
        folder.done.unlink(missing_ok=True)
        fileio.write_npy(folder.oof, blend_probs(member_probs[fold], weights).astype(np.float16))
        fileio.write_text(folder.oof_ids, "\n".join(ids) + "\n")
        # seconds: the members' training of this fold, added up (what the blend cost to train)
        fileio.write_json(folder.done, {
            "fold": fold, "blend": True, "seconds": round(sum(m.fold_seconds[fold] for m in members), 1),
            "config_digest": training_digest(cfg), "files": fold_file_digests(folder.path, [])})
    del member_probs
    test_ids = list(first.test_ids)
    test = blend_probs([member_test(m, test_ids) for m in members], weights).astype(np.float16)
    predicted = read_predict_meta(first.run)
    write_predictions(run, test_ids, test, {
        "tta": ["blend"], "folds": cfg.fold_list(), "n_images": len(test_ids),
        "data": predicted.get("data", cfg.data), "test_fingerprint": predicted.get("test_fingerprint", ""),
        "inputs": finished_folds(cfg, run)})
    blend = {**blend, "inputs_digest": digest, "finished": True}
    fileio.write_json(run / BLEND_FILE, blend)
    return blend


def blend_runs(runs: list[str | Path], name: str, *, weights: str = "auto", runs_dir: str | Path = "runs",
               data_dir: str | Path | None = None, force: bool = False,
               leaderboard_csv: str | Path = LEADERBOARD_CSV,
               submission: str | Path | None = None, pictures: bool = True) -> Path:
    """Blend `runs` into runs_dir/name, tune, submit (checked) and draw; returns the submission path."""
    from pipeline.show import show_run
    from pipeline.submit import submit_run
    from pipeline.tune import tune_run

    if not runs:
        raise PipelineError("--runs: give at least one run folder")
    check_plain_name(name, "--name")  # it becomes runs/<name>/ and submissions/<name>.csv
    members = [read_member(r) for r in runs]
    check_members_agree(members)
    if len({m.run.resolve() for m in members}) < len(members):
        print("note: a run is given more than once; it counts once per mention", file=sys.stderr)
    parse_weights(weights, len(members))  # a bad --weights is refused before any work
    run = Path(runs_dir) / name
    _check_target(run, members, force)
    cfg = dataclasses.replace(members[0].cfg, name=name, runs_dir=str(run.parent))
    digest = _inputs_digest(members, [member_digest(m) for m in members], weights, cfg)

    if force or not _blend_is_current(run, digest, cfg.fold_list()):
        print(f"== blend: {len(members)} runs -> {run}")
        blend = make_blend(members, run, weights, digest, data_dir)
        print(format_search(blend))
    else:
        blend = fileio.read_json(run / BLEND_FILE)
        print(f"== blend: {run / BLEND_FILE} is up to date ({describe_members(blend)})")

    if force or not tune_is_current(load_run_config(run), run):
        print("== tune")
        tune_run(run, leaderboard_csv=leaderboard_csv)
    else:
        print(f"== tune: {RunDir(run).tune} is up to date")
    print("== submit")
    path = submit_run(run, out=submission, data_dir=data_dir)
    if pictures:
        shown = RunDir(run).show / "test_samples.png"
        if force or not _is_fresh(shown, [RunDir(run).tune, RunDir(run).probs]):
            print("== show")
            drawn = show_run(run, data_dir=data_dir)
            print(f"pictures: {', '.join(str(p) for p in drawn)}")
    return path


def format_search(blend: dict[str, Any]) -> str:
    search = blend["search"]
    lines = [f"  weights: {describe_members(blend)}  ({search.get('mode')})"]
    if "cv_nested_equal" in search:
        lines.append(
            f"  {search['n_candidates']} mixes searched, each with its post-processing tuned: best in-sample "
            f"{search['cv_best_in_sample']:.4f} at {search['best_in_sample']} vs equal weights {search['cv_equal']:.4f}")
        lines.append(
            f"  nested (weights and rule chosen on the other folds): search {search['cv_nested']:.4f}, equal weights "
            f"{search['cv_nested_equal']:.4f} -> kept {search['kept']}; per-fold choices {search['per_fold_choice']}")
    elif "cv_nested" in search:
        lines.append(f"  nested CV (rule chosen on the other folds): {search['cv_nested']:.4f}")
    return "\n".join(lines)
