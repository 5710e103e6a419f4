"""`sluice router`: train the router's classifier head and show how it does on held-out data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tasks.files import ROUTER_EXAMPLES_PATH, ROUTER_RULES_PATH, TEMPLATES_PATH
from tasks.router_classifier import Evaluation, RouterHead, head_path

router_app = typer.Typer(help="The router's classifier.", no_args_is_help=True)
console = Console(stderr=True)
out = Console()


@router_app.command("train")
def router_train(
    examples: Annotated[Path, typer.Option(help="labelled examples, JSONL")] = ROUTER_EXAMPLES_PATH,
    rules: Annotated[Path, typer.Option(help="the router YAML with the classifier parameters")]
    = ROUTER_RULES_PATH,
    cache_dir: Annotated[Path | None, typer.Option(help="default: <data dir>/router")] = None,
    min_accuracy: Annotated[float, typer.Option(help="exit 1 below this held-out accuracy")] = 0.9,
) -> None:
    """Train the head on the examples, save it by version, print held-out accuracy and confusion."""
    from ops.cli_support import load_settings
    from tasks.embedding import Embedder
    from tasks.router import RouterRules, RouterRulesError
    from tasks.router_classifier import RouterClassifierError, train_router

    settings = load_settings()
    try:
        params = RouterRules.load(rules, TEMPLATES_PATH).classifier
        target = cache_dir or settings.router_dir
        with console.status("embedding examples and training the head"):
            head = train_router(examples, params, target, Embedder(settings.embedder_model))
    except (RouterClassifierError, RouterRulesError, ValueError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    _print_head(head, head_path(target, head.version))
    assert head.evaluation is not None
    if head.evaluation.accuracy < min_accuracy:
        console.print(f"[red]held-out accuracy {head.evaluation.accuracy:.1%} is below "
                      f"{min_accuracy:.1%}[/red]")
        raise typer.Exit(1)


def _print_head(head: RouterHead, path: Path) -> None:
    evaluation = head.evaluation
    assert evaluation is not None
    out.print(f"router head [bold]{head.version}[/bold] saved to {path}")
    out.print(f"params: {head.params.model_dump()}")
    out.print(f"trained on {evaluation.n_train} examples, held out {evaluation.n_test}")
    out.print(f"held-out accuracy: [bold]{evaluation.accuracy:.1%}[/bold] "
              f"(best class alone, no threshold: {evaluation.argmax_accuracy:.1%})")
    out.print(confusion_table(evaluation))


def confusion_table(evaluation: Evaluation) -> Table:
    """Rows: the true class; columns: what the router decided."""
    table = Table("true \\ decided", *(label.value for label in evaluation.labels),
                  title="held-out confusion matrix")
    for i, (label, row) in enumerate(zip(evaluation.labels, evaluation.confusion, strict=True)):
        table.add_row(label.value, *(_cell(n, diagonal=i == j) for j, n in enumerate(row)))
    return table


def _cell(count: int, diagonal: bool) -> str:
    if diagonal:
        return f"[bold green]{count}[/bold green]"
    return f"[red]{count}[/red]" if count else "."
