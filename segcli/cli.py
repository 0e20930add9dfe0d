"""The ``segcli`` command line: parse -> one API call -> render.

User errors (:class:`SegcliError`) become one line on stderr and exit code 2; ``--debug`` shows
the traceback instead. No logic lives here beyond presentation.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import typer
from rich.console import Console
from rich.table import Table

from .errors import SegcliError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Semantic segmentation: NRD, SegViT (ATM, Shrunk, CL) and DToP from one engine.")
data_app = typer.Typer(no_args_is_help=True, help="Dataset utilities.")
app.add_typer(data_app, name="data")

SetOpt = typer.Option(None, "--set", "-s", help="Override a recipe key: --set train.max_iters=100 (repeatable).")


def _console(stderr: bool = False) -> Console:
    """Rich console; long lines (paths, commands, summaries) are never wrapped mid-line, so the
    output stays greppable and copy-pasteable when piped (rich assumes 80 columns then)."""
    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _error_text(err: SegcliError) -> str:
    text = err.one_line()
    if "Original Traceback" in text:  # raised inside a DataLoader worker: keep its last line
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split("SegcliError: ", 1)[-1]
    return text


def _guard(ctx: typer.Context, fn, *args, **kwargs):
    debug = bool(ctx.obj and ctx.obj.get("debug"))
    try:
        return fn(*args, **kwargs)
    except SegcliError as err:
        if debug:
            raise
        _console(stderr=True).print(f"[bold red]error:[/] {_error_text(err)}")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        _console(stderr=True).print("interrupted")
        raise typer.Exit(130) from None


@app.callback()
def _root(ctx: typer.Context, debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")):
    ctx.obj = {"debug": debug}


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.2f}"


def _metrics_table(metrics: dict, title: str) -> Table:
    table = Table(title=title)
    table.add_column("class")
    table.add_column("IoU", justify="right")
    table.add_column("Acc", justify="right")
    for row in metrics["per_class"]:
        table.add_row(row["class"], _fmt(row["IoU"]), _fmt(row["Acc"]))
    table.add_section()
    table.add_row("[bold]mean[/]", f"[bold]{_fmt(metrics['mIoU'])}[/]", f"[bold]{_fmt(metrics['mAcc'])}[/]")
    return table


def _summary_line(metrics: dict) -> str:
    parts = [f"mIoU {_fmt(metrics['mIoU'])}", f"mAcc {_fmt(metrics['mAcc'])}", f"aAcc {_fmt(metrics['aAcc'])}"]
    if "trimap_mIoU" in metrics:
        parts.append(f"trimap({metrics['trimap_width']}px) mIoU {_fmt(metrics['trimap_mIoU'])}")
    if "gflops_avg" in metrics:
        parts.append(f"GFLOPs/image {metrics['gflops_avg']:.2f}")
    return "  ".join(parts)


# --------------------------------------------------------------------------- train


class _TrainReporter:
    """Rich progress on a terminal; plain log lines otherwise (CI, pipes)."""

    def __init__(self, console: Console, log_every: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = console
        self.log_every = max(1, log_every)
        self.interactive = console.is_terminal
        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console,
                                 disable=not self.interactive)
        self.task = None

    def __call__(self, event: str, info: dict) -> None:
        if event == "step":
            if self.task is None:
                self.task = self.progress.add_task("train", total=info["max_iters"], info="")
                self.progress.start()
            text = f"loss {info['loss']:.4f}  lr {info['lr']:.2e}"
            self.progress.update(self.task, completed=info["iter"], info=text)
            if not self.interactive and (info["iter"] % self.log_every == 0 or info["iter"] == info["max_iters"]):
                self.console.print(f"iter {info['iter']}/{info['max_iters']}  {text}")
        elif event == "eval":
            self.progress.console.print(f"[bold]eval @ {info['iter']}[/]  {_summary_line(info)}")

    def close(self) -> None:
        self.progress.stop()


@app.command()
def train(
    ctx: typer.Context,
    recipe: Path = typer.Argument(..., help="Recipe YAML."),
    work_dir: Optional[Path] = typer.Option(None, "--work-dir", "-w", help="Output folder (default runs/<recipe name>)."),
    set_: Optional[List[str]] = SetOpt,
    resume: bool = typer.Option(False, "--resume", help="Continue exactly from WORK_DIR/last.pt."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N (default: cuda if available)."),
):
    """Train a recipe; evaluate it; write last.pt, best.pt, metrics.jsonl and recipe.yaml."""
    from . import api

    console = _console()
    main = _is_main_process()

    def run():
        rec = api.load_recipe(recipe, set_ or [])
        reporter = _TrainReporter(console, rec.train.log_interval) if main else None
        try:
            result = api.train(rec, work_dir=work_dir, resume=resume, device=device, callback=reporter)
        finally:
            if reporter:
                reporter.close()
        return rec, result

    rec, result = _guard(ctx, run)
    if not main:
        return
    if result.metrics:
        console.print(_metrics_table(result.metrics, f"{rec.name} @ {result.iterations} iterations"))
    console.print(f"wrote {result.last}" + (f" and {result.best} (best mIoU {result.best_miou:.2f})" if result.best else ""))
    best = result.best or result.last
    console.print(f"next: segcli predict {_val_images(rec)} --checkpoint {best} --overlay")
    console.print(f"      segcli eval {best} --json")


def _val_images(rec) -> str:
    """The validation image folder of a folder-layout recipe (something to predict on), else IMAGE."""
    from .data.synthetic import DEFAULT_ROOT

    if rec.data.type not in ("synthetic", "folder"):
        return "IMAGE"
    folder = Path(rec.data.root or DEFAULT_ROOT) / "images" / rec.data.val_split
    return str(folder) if folder.is_dir() else "IMAGE"


# --------------------------------------------------------------------------- eval


@app.command("eval")
def eval_(
    ctx: typer.Context,
    checkpoint: Path = typer.Argument(..., help="A checkpoint written by segcli (its recipe is embedded)."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", help="Use this recipe instead of the embedded one."),
    set_: Optional[List[str]] = SetOpt,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    flops: bool = typer.Option(False, "--flops", help="Add gflops_avg: fvcore GFLOPs averaged over the images."),
    trimap: Optional[int] = typer.Option(None, "--trimap", help="Add trimap_mIoU within W px of GT boundaries."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate the first N images only."),
    device: Optional[str] = typer.Option(None, "--device"),
):
    """Evaluate a checkpoint on its dataset's validation split."""
    from . import api

    console = _console(stderr=json_out)
    metrics = _guard(ctx, api.evaluate, checkpoint, recipe=recipe, overrides=set_ or [], device=device,
                     trimap=trimap, flops=flops, limit=limit)
    if json_out:
        typer.echo(json.dumps(metrics))
        return
    console.print(_metrics_table(metrics, str(checkpoint)))
    console.print(_summary_line(metrics))


# --------------------------------------------------------------------------- predict


@app.command()
def predict(
    ctx: typer.Context,
    inputs: List[str] = typer.Argument(..., help="Images, folders or globs."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="A segcli checkpoint."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="A named model from the cache (see README)."),
    out: Path = typer.Option(Path("predictions"), "--out", "-o", help="Output folder."),
    overlay: bool = typer.Option(False, "--overlay", help="Also write <stem>_overlay.png (image blended with colours)."),
    show_pruning: bool = typer.Option(False, "--show-pruning", help="DToP: write per-stage maps of exited tokens."),
    device: Optional[str] = typer.Option(None, "--device"),
):
    """Segment images; writes <stem>.png (class ids) and <stem>_color.png to --out."""
    from . import api, zoo

    def run():
        if (checkpoint is None) == (model is None):
            raise SegcliError("give exactly one of --checkpoint or --model", "predict")
        path = checkpoint if checkpoint is not None else zoo.resolve(model)
        return api.predict(list(inputs), path, out_dir=out, overlay=overlay, device=device, show_pruning=show_pruning)

    result = _guard(ctx, run)
    console = _console()
    err = _console(stderr=True)
    for path, reason in result.failed:
        err.print(f"[bold red]error:[/] {path}: {reason} (skipped)")
    images = len([p for p in result.written if p.name.endswith("_color.png")])
    console.print(f"wrote {images} prediction(s) to {out}/")
    if result.failed:
        raise typer.Exit(2)


# --------------------------------------------------------------------------- flops


@app.command()
def flops(
    ctx: typer.Context,
    recipe: Path = typer.Argument(..., help="Recipe YAML."),
    shape: Optional[Tuple[int, int]] = typer.Option(None, "--shape", help="Input H W (default: the crop size)."),
    set_: Optional[List[str]] = SetOpt,
    json_out: bool = typer.Option(False, "--json", help="Print {\"gflops\", \"params_m\"} as JSON."),
):
    """GFLOPs (fvcore, attention counted) and parameters of a recipe's model."""
    from . import api

    result = _guard(ctx, api.flops, recipe, shape=tuple(shape) if shape else None, overrides=set_ or [])
    if json_out:
        typer.echo(json.dumps(result))
        return
    h, w = result["shape"]
    _console().print(f"{recipe}: {result['gflops']:.2f} GFLOPs at {h}x{w}, {result['params_m']:.2f} M parameters")


# --------------------------------------------------------------------------- DToP and SegViT-CL


@app.command()
def prune(
    ctx: typer.Context,
    checkpoint: Path = typer.Argument(..., help="A trained checkpoint with auxiliary heads on the exit blocks."),
    p0: float = typer.Option(0.95, "--p0", help="Exit threshold on a token's max class probability (1.0 = no pruning)."),
    k: int = typer.Option(5, "--k", help="Top-k most confident exiting tokens per class kept for context."),
    exit_layers: Optional[str] = typer.Option(None, "--exit-layers", "--layers",
                                              help="0-based exit blocks, e.g. 5,7 (default: every aux head)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output checkpoint (default <stem>_dtop.pt)."),
):
    """DToP@Direct: write a pruned checkpoint that eval/predict/flops use as is (thesis ch. 5)."""
    from . import api

    def run():
        try:
            return api.prune(checkpoint, p0=p0, k=k, exit_layers=exit_layers, out=out)
        except SegcliError as err:  # an error about an option names its flag (same name)
            if err.where in ("p0", "k", "exit_layers"):
                raise SegcliError(err.message, "--" + err.where.replace("_", "-"), err.hint) from None
            raise

    path = _guard(ctx, run)
    _console().print(f"wrote {path} (p0={p0}, k={k})")
    _console().print(f"next: segcli eval {path} --flops")
    _console().print(f"      segcli predict IMAGE --checkpoint {path} --show-pruning")


@app.command("cl-step")
def cl_step(
    ctx: typer.Context,
    recipe: Optional[Path] = typer.Argument(
        None, help="A recipe with a cl: section and model.type: continual (optional for --task N > 1: "
                   "continues the run in --work-dir, or the only one under runs/)."),
    task: int = typer.Option(..., "--task", help="1 = base classes; N > 1 adds task N's classes."),
    work_dir: Optional[Path] = typer.Option(None, "--work-dir", "-w", help="Default runs/<recipe name>; writes DIR/task{N}/."),
    set_: Optional[List[str]] = SetOpt,
    resume: bool = typer.Option(False, "--resume", help="Continue DIR/task{N}/last.pt exactly."),
    device: Optional[str] = typer.Option(None, "--device"),
):
    """SegViT-CL: train one continual-learning step with every earlier parameter frozen (thesis 4.2.3)."""
    from . import api

    console = _console()
    main = _is_main_process()

    def run():
        reporter = _TrainReporter(console, 50) if main else None
        try:
            return api.cl_step(recipe, task, work_dir=work_dir, overrides=set_ or [], device=device, resume=resume,
                               callback=reporter)
        finally:
            if reporter:
                reporter.close()

    result = _guard(ctx, run)
    if not main:
        return
    if result.metrics:
        console.print(_metrics_table(result.metrics, f"task {result.task}/{result.num_tasks} @ {result.iterations} iterations"))
    console.print(f"task {result.task}/{result.num_tasks}: learnt classes {list(result.classes)} on "
                  f"{result.num_images} images; wrote {result.checkpoint}")
    if result.task < result.num_tasks:
        console.print(f"next: segcli cl-step --task {result.task + 1} --work-dir {result.work_dir.parent}")
    console.print(f"eval: segcli eval {result.checkpoint} --json   (adds base/new/all mIoU and forgetting)")


# --------------------------------------------------------------------------- data


@data_app.command("synth")
def data_synth(
    ctx: typer.Context,
    out: Path = typer.Argument(..., help="Output folder (folder layout)."),
    n: int = typer.Option(96, "--n", help="Training images."),
    n_val: int = typer.Option(24, "--n-val", help="Validation images."),
    size: int = typer.Option(128, "--size", help="Image side in pixels."),
    seed: int = typer.Option(0, "--seed"),
):
    """Write the synthetic dataset in the `folder` layout."""
    from .data.synthetic import generate_synthetic

    root = _guard(ctx, generate_synthetic, out, n, n_val, size, seed)
    _console().print(f"wrote {n} + {n_val} images to {root}/ (folder layout)")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
