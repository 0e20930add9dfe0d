"""The ``segcli`` command line: parse -> one API call -> render.

User errors (:class:`SegcliError`) become one line on stderr and exit code 2; ``--debug`` shows
the traceback instead. No logic lives here beyond presentation.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .allocator import retain_freed_memory
from .errors import SegcliError

# rich_markup_mode=None: click's plain help, which shows a boolean flag as a flag (rich help writes "<bool>")
app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Semantic segmentation: NRD, SegViT (ATM, Shrunk, CL) and DToP from one engine.")
data_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Dataset utilities.")
app.add_typer(data_app, name="data")
zoo_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Named models (--model NAME).")
app.add_typer(zoo_app, name="zoo")

SetOpt = typer.Option(None, "--set", "-s", metavar="KEY=VALUE", help="Override a recipe key: --set train.max_iters=100 (repeatable).")
DEVICE_HELP = "cpu, cuda or cuda:N (default: cuda if available)."
COMPILE_HELP = "torch.compile the backbone and head first (the first image pays the compilation; pays off over many images of one size)."
AUG_TEST_HELP = "Multi-scale (0.5-1.75 of the test scale) and flip test, as MMSegmentation's --aug-test."


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
        _console(stderr=True).print(f"[bold red]error:[/] {escape(_error_text(err))}")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        _console(stderr=True).print("interrupted")
        raise typer.Exit(130) from None


MODEL_HELP = "A named model instead (`segcli zoo list`): a released one is downloaded and converted on first use."


def _size(num_bytes: int | None) -> str:
    return "size unknown" if num_bytes is None else f"{num_bytes / 2**20:.1f} MiB"


class _DownloadReporter:
    """Renders download.Transfer reports: one line saying what, from where, its size and where it
    is cached, then a progress bar on a terminal, then the cached path."""

    def __init__(self, console: Console):
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        self.console = console
        self.progress = Progress(TextColumn("[bold]download"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                 console=console, disable=not console.is_terminal)
        self.tasks: dict[str, int] = {}

    def __call__(self, transfer) -> None:
        key = transfer.source
        if key not in self.tasks:
            if transfer.finished:  # nothing was transferred (a cache answered)
                return
            resumed = f", resuming at {_size(transfer.done)}" if transfer.done else ""
            self.console.print(escape(f"download {transfer.what} from {transfer.source} ({_size(transfer.size)}"
                                      f"{resumed}) -> {transfer.dest}"))
            self.tasks[key] = self.progress.add_task(transfer.what, total=transfer.size, completed=transfer.done)
            self.progress.start()
        self.progress.update(self.tasks[key], completed=transfer.done, total=transfer.size)
        if transfer.finished:
            self.progress.stop()
            self.console.print(escape(f"cached {transfer.dest}"))


def _checkpoint_or_model(checkpoint: Optional[Path], model: Optional[str], console: Console) -> Path:
    """The checkpoint file of ``--checkpoint``/CHECKPOINT or ``--model NAME`` (exactly one)."""
    from . import api

    if (checkpoint is None) == (model is None):
        raise SegcliError("give a checkpoint or --model NAME" + (", not both" if model else ""), "--model",
                          "`segcli zoo list` shows the names")
    if checkpoint is not None:
        return checkpoint
    return api.resolve_model(model, progress=_DownloadReporter(console), notify=lambda line: console.print(escape(line)))


def _print_version(value: bool) -> None:
    if value:
        from .version import __version__

        typer.echo(f"segcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(ctx: typer.Context, debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
          version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the version and exit.")):
    ctx.obj = {"debug": debug}
    retain_freed_memory()  # one job per process: keep freed blocks for reuse (see segcli/allocator.py)


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
        table.add_row(escape(row["class"]), _fmt(row["IoU"]), _fmt(row["Acc"]))
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
    """Rich progress on a terminal; plain log lines otherwise (CI, pipes). Every line it shows also
    goes, as plain text, to ``WORK_DIR/train.log`` (with the log steps that a terminal shows only in
    its progress bar), from the moment the run has created its work dir."""

    def __init__(self, console: Console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = console
        self.log_every = 1  # train.log_interval, from the "start" event
        self.interactive = console.is_terminal
        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console,
                                 disable=not self.interactive)
        self.task = None
        self.saved: dict | None = None  # the last "checkpoint" event: what an interruption leaves
        self.log_path: Path | None = None
        self.unwritten: list[str] = []  # lines shown before the work dir existed
        self.downloads: _DownloadReporter | None = None  # renders "download" events (pretrained weights)

    def _log(self, markup: str) -> None:
        from rich.text import Text

        self.unwritten.append(Text.from_markup(markup).plain)
        if self.log_path is not None and self.log_path.parent.is_dir():
            with self.log_path.open("a") as handle:
                handle.write("".join(line + "\n" for line in self.unwritten))
            self.unwritten.clear()

    def _show(self, markup: str, console: Console | None = None, **style) -> None:
        (console or self.console).print(markup, **style)
        self._log(markup)

    def __call__(self, event: str, info: dict) -> None:
        if event == "start":
            self.log_path = Path(info["work_dir"]) / "train.log"
            self.log_every = info["log_interval"]
            start = f", resuming at iteration {info['start_iter']}" if info["start_iter"] else ""
            self._show(f"[bold]{escape(str(info['recipe']))}[/]: " + escape(
                f"{info['model']}, {info['params_m']:.2f} M parameters; {info['dataset']} "
                f"({info['data_root'] or 'default root'}): {info['train_images']} train / {info['val_images']} val "
                f"images; {info['max_iters']} iterations{start} on {info['device']} -> {info['work_dir']}/"))
        elif event == "experiment":
            if info["matches"]:
                self._show(f"[bold green]this run is the published experiment:[/] {escape(info['published'])}")
            else:
                self._show(f"published experiment: {escape(info['published'])}")
                for line in info["differences"]:
                    self._show(f"  [bold yellow]differs:[/] {escape(line)}")
        elif event == "warning":
            self._show(f"[bold yellow]warning:[/] {escape(info['message'])}", self.progress.console)
        elif event == "download":  # the backbone's pretrained weights, before the run starts
            from .download import Transfer

            if self.downloads is None:
                self.downloads = _DownloadReporter(self.console)
            self.downloads(Transfer(**info))
        elif event == "checkpoint":
            self.saved = info
        elif event == "step":
            if self.task is None:
                self.task = self.progress.add_task("train", total=info["max_iters"], info="")
                self.progress.start()
            text = f"loss {info['loss']:.4f}  lr {info['lr']:.2e}"
            self.progress.update(self.task, completed=info["iter"], info=text)
            if info["iter"] % self.log_every == 0 or info["iter"] == info["max_iters"]:
                line = f"iter {info['iter']}/{info['max_iters']}  {text}"
                if self.interactive:  # the bar shows it; the log keeps it
                    self._log(line)
                else:
                    self._show(line)
        elif event == "eval":
            self._show(f"[bold]eval @ {info['iter']}[/]  {_summary_line(info)}", self.progress.console)

    def close(self) -> None:
        self.progress.stop()

    def interrupted(self, resume_command: str) -> None:
        """Ctrl-C: say what was saved and how to continue (the trainer saves last.pt before leaving)."""
        if self.saved:
            self._show(escape(f"interrupted: saved {self.saved['path']} at iteration {self.saved['iter']}; "
                              f"resume with: {resume_command}"), style="bold")
        else:
            self._show("interrupted before anything was saved", style="bold")

    def finished(self, lines: list[str]) -> None:
        """The closing lines (metrics, files written) into the log too."""
        for line in lines:
            self._log(escape(line))


def _command(*parts, sets=(), device: str | None = None) -> str:
    """A copy-pasteable command line (each part shell-quoted)."""
    import shlex

    words = [str(p) for p in parts if p is not None]
    for item in sets or ():
        words += ["--set", item]
    if device:
        words += ["--device", device]
    return " ".join(shlex.quote(w) for w in words)


def _train_reported(json_out: bool, start, resume_command, closing):
    """The one way ``train`` and ``cl-step`` run: ``start(callback)`` with a :class:`_TrainReporter`
    on rank 0 (on stderr with ``--json``; no output on other ranks), and one Ctrl-C handler: the
    trainer leaves at an iteration boundary with ``last.pt`` written, the reporter says what was
    saved and how to go on (``resume_command()``), exit 130. ``closing(result)`` gives the closing
    lines, which go to ``train.log`` too."""
    reporter = _TrainReporter(_console(stderr=json_out)) if _is_main_process() else None
    try:
        result = start(reporter)
    except KeyboardInterrupt:
        if reporter:
            reporter.close()
            reporter.interrupted(resume_command())
        raise typer.Exit(130) from None
    finally:
        if reporter:
            reporter.close()
    if reporter:
        reporter.finished(closing(result))
    return result


def _closing_lines(iterations: int, metrics: dict | None, written: str) -> list[str]:
    return ([f"final @ {iterations}: {_summary_line(metrics)}"] if metrics else []) + [f"wrote {written}"]


def _train_summary(result, json_out: bool, title: str, lines: list[str]) -> None:
    """The end of ``train`` and ``cl-step`` (rank 0 only): ``result.to_dict()`` as JSON, or the final
    metrics table titled ``title`` and ``lines``."""
    if not _is_main_process():
        return
    if json_out:
        typer.echo(json.dumps(result.to_dict()))
        return
    console = _console()
    if result.metrics:
        console.print(_metrics_table(result.metrics, title))
    for line in lines:
        console.print(line)


@app.command()
def train(
    ctx: typer.Context,
    recipe: Path = typer.Argument(..., help="Recipe YAML."),
    work_dir: Optional[Path] = typer.Option(None, "--work-dir", "-w", help="Output folder (default runs/<recipe name>)."),
    set_: Optional[List[str]] = SetOpt,
    resume: bool = typer.Option(False, "--resume", help="Continue exactly from WORK_DIR/last.pt."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier run in WORK_DIR (its checkpoints and metrics)."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout (progress goes to stderr)."),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
):
    """Train a recipe; evaluate it; write last.pt, best.pt, metrics.jsonl and recipe.yaml."""
    from . import api

    def run():
        rec = api.load_recipe(recipe, set_ or [])
        result = _train_reported(
            json_out, lambda callback: api.train(recipe, work_dir=work_dir, overrides=set_ or [], resume=resume,
                                                device=device, callback=callback, overwrite=overwrite),
            lambda: _command("segcli", "train", recipe, "--work-dir", work_dir or Path("runs") / rec.name, "--resume",
                             sets=set_, device=device),
            lambda result: _closing_lines(result.iterations, result.metrics,
                                          f"{result.last}" + (f" and {result.best}" if result.best else "")))
        return rec, result

    rec, result = _guard(ctx, run)
    best = result.best or result.last
    _train_summary(result, json_out, f"{rec.name} @ {result.iterations} iterations", [
        f"wrote {result.last}" + (f" and {result.best} (best mIoU {result.best_miou:.2f})" if result.best else ""),
        f"next: segcli predict {_val_images(rec)} --checkpoint {best} --overlay",
        f"      segcli eval {best} --json"])


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
    checkpoint: Optional[Path] = typer.Argument(None, help="A checkpoint written by segcli (its recipe is embedded)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", help="Use this recipe instead of the embedded one."),
    set_: Optional[List[str]] = SetOpt,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    flops: bool = typer.Option(False, "--flops", help="Add gflops_avg: fvcore GFLOPs averaged over the images."),
    trimap: Optional[int] = typer.Option(None, "--trimap", help="Add trimap_mIoU within W px of GT boundaries."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate the first N images only."),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    compile_: bool = typer.Option(False, "--compile", help=COMPILE_HELP),
    aug_test: bool = typer.Option(False, "--aug-test", help=AUG_TEST_HELP),
    show_dir: Optional[Path] = typer.Option(None, "--show-dir", help="Write <stem>.png per image: the prediction over the image, with a key."),
    confusion: Optional[Path] = typer.Option(None, "--confusion", help="Write the row-normalised confusion matrix as a PNG."),
    opacity: float = typer.Option(0.5, "--opacity", help="Colour weight of --show-dir images: 0 = image, 1 = colours."),
    format_only: Optional[Path] = typer.Option(None, "--format-only", help="Compute no metrics; write each image's label map, in the dataset's own ids, to DIR/<stem>.png (for a benchmark server)."),
    split: Optional[str] = typer.Option(None, "--split", help="With --format-only: the split folder/list to read (e.g. test); masks not needed."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --show-dir / --confusion / --format-only files of an earlier run."),
):
    """Evaluate a checkpoint on its dataset's validation split."""
    from . import api

    console = _console(stderr=json_out)
    checkpoint = _guard(ctx, _checkpoint_or_model, checkpoint, model, _console(stderr=True))
    metrics = _guard(ctx, api.evaluate, checkpoint, recipe=recipe, overrides=set_ or [], device=device,
                     trimap=trimap, flops=flops, limit=limit, compile=compile_, aug_test=aug_test,
                     show_dir=show_dir, confusion=confusion, opacity=opacity, overwrite=overwrite,
                     format_only=format_only, split=split)
    if json_out:
        typer.echo(json.dumps(metrics))
        return
    if "format_only" in metrics:
        console.print(f"wrote {metrics['num_images']} label map(s) of split '{metrics['split']}' to "
                      f"{metrics['format_only']}/ (no metrics: --format-only)")
        if "show_dir" in metrics:
            console.print(f"wrote {metrics['num_images']} image(s) to {metrics['show_dir']}/")
        return
    console.print(_metrics_table(metrics, str(checkpoint)))
    console.print(_summary_line(metrics))
    if "show_dir" in metrics:
        console.print(f"wrote {metrics['num_images']} image(s) to {metrics['show_dir']}/")
    if "confusion_png" in metrics:
        console.print(f"wrote {metrics['confusion_png']}")


# --------------------------------------------------------------------------- predict


@app.command()
def predict(
    ctx: typer.Context,
    inputs: List[str] = typer.Argument(..., metavar="INPUT", help="Images, folders or globs."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="A segcli checkpoint."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    out: Path = typer.Option(Path("predictions"), "--out", "-o", help="Output folder."),
    overlay: bool = typer.Option(False, "--overlay", help="Also write <stem>_overlay.png (image blended with colours, legend beside)."),
    opacity: float = typer.Option(0.5, "--opacity", help="Colour weight in the overlay: 0 = image, 1 = colours."),
    show_pruning: bool = typer.Option(False, "--show-pruning", help="DToP: write per-stage maps of exited tokens."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace predictions of an earlier run in --out (never an input)."),
    json_out: bool = typer.Option(False, "--json", help="Print {\"written\", \"failed\"} as JSON on stdout."),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    compile_: bool = typer.Option(False, "--compile", help=COMPILE_HELP),
    aug_test: bool = typer.Option(False, "--aug-test", help=AUG_TEST_HELP),
):
    """Segment images; writes <stem>.png (class ids) and <stem>_color.png to --out."""
    from . import api

    def run():
        path = _checkpoint_or_model(checkpoint, model, _console(stderr=True))
        return api.predict(list(inputs), path, out_dir=out, overlay=overlay, device=device, show_pruning=show_pruning,
                           overwrite=overwrite, opacity=opacity, compile=compile_, aug_test=aug_test)

    result = _guard(ctx, run)
    if json_out:
        typer.echo(json.dumps(result.to_dict()))
        raise typer.Exit(2 if result.failed else 0)
    console = _console()
    err = _console(stderr=True)
    for path, reason in result.failed:
        err.print(f"[bold red]error:[/] {escape(f'{path}: {reason}')} (skipped)")
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


@app.command()
def benchmark(
    ctx: typer.Context,
    sources: Optional[List[Path]] = typer.Argument(None, help="Recipes (random weights), segcli checkpoints and/or exported .onnx files."),
    models: Optional[List[str]] = typer.Option(None, "--model", "-m", help=MODEL_HELP + " Repeatable; timed after SOURCES."),
    shape: Optional[Tuple[int, int]] = typer.Option(None, "--shape", help="Input H W (default: each crop size)."),
    batch: int = typer.Option(1, "--batch", help="Images per call."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default: as is)."),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    repeats: int = typer.Option(5, "--repeats", help="Timed calls per model (round-robin)."),
    warmup: int = typer.Option(1, "--warmup", help="Untimed calls per model first (>= 1)."),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the backbone and head first."),
    backbone_only: bool = typer.Option(False, "--backbone-only", help="Time the bare encoder."),
    mode: str = typer.Option("whole", "--mode", help="whole or slide (the recipe's test crop and stride)."),
    set_: Optional[List[str]] = SetOpt,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout (schema: README)."),
):
    """Latency, throughput, peak memory, GFLOPs and parameters; several models are timed round-robin."""
    from . import api

    err = _console(stderr=True)
    if not sources and not models:
        _guard(ctx, _checkpoint_or_model, None, None, err)  # the one "give a checkpoint or --model" error
    sources = list(sources or []) + [_guard(ctx, _checkpoint_or_model, None, name, err) for name in models or []]
    result = _guard(ctx, api.benchmark, sources, shape=tuple(shape) if shape else None, batch=batch,
                    threads=threads, device=device, repeats=repeats, warmup=warmup, compile=compile_,
                    backbone_only=backbone_only, mode=mode, overrides=set_ or [],
                    progress=lambda done, total: err.print(f"\rbenchmark: call {done}/{total}", end=""))
    err.print()
    if json_out:
        typer.echo(json.dumps(result))
        return
    console = _console()
    console.print(f"{result['device']}, batch {result['batch']}, {result['threads']} threads, {result['mode']} mode"
                  f"{', backbone only' if result['backbone_only'] else ''}, median of {result['repeats']} calls")
    width = max(len(row["name"]) for row in result["models"])
    console.print(f"{'model':{width}s} {'shape':>9s} {'median s':>9s} {'min s':>9s} {'img/s':>8s} {'peak MiB':>9s} "
                  f"{'GFLOPs':>8s} {'params M':>8s} {'x first':>7s}")
    for row in result["models"]:
        peak = "-" if row["peak_memory_mib"] is None else f"{row['peak_memory_mib']:.0f}"
        console.print(f"{row['name']:{width}s} {'x'.join(map(str, row['shape'])):>9s} {row['latency_median_s']:9.4f} "
                      f"{row['latency_min_s']:9.4f} {row['throughput_ips']:8.2f} {peak:>9s} {row['gflops']:8.2f} "
                      f"{row['params_m']:8.2f} {row['ratio']['latency_median_s']:7.3f}")
    first = ", ".join(f"{row['name']} {row['first_call_s']:.2f} s" for row in result["models"])
    console.print(f"first call{' (torch.compile)' if result['compile'] else ''}, not timed: {first}")
    load = result["load_average"]
    if load is not None:
        console.print(f"load average during the run: {load[0]:.2f} ({os.cpu_count()} CPUs)")


# --------------------------------------------------------------------------- DToP and SegViT-CL


@app.command()
def prune(
    ctx: typer.Context,
    checkpoint: Optional[Path] = typer.Argument(None, help="A trained checkpoint with auxiliary heads on the exit blocks."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    p0: float = typer.Option(0.95, "--p0", help="Exit threshold on a token's max class probability (1.0 = no pruning)."),
    k: int = typer.Option(5, "--k", help="Top-k most confident exiting tokens per class kept for context."),
    exit_layers: Optional[str] = typer.Option(None, "--exit-layers", "--layers",
                                              help="0-based exit blocks, e.g. 5,7 (default: every aux head)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output checkpoint (default <stem>_dtop.pt beside it; with --model: NAME_dtop.pt here)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out (never the input)."),
    json_out: bool = typer.Option(False, "--json", help="Print {\"checkpoint\", \"p0\", \"k\"} as JSON on stdout."),
):
    """DToP@Direct: write a pruned checkpoint that eval/predict/flops use as is (thesis ch. 5)."""
    from . import api

    def flagged(fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SegcliError as err:  # an error about an option names its flag (same name)
            if err.where in ("p0", "k", "exit_layers"):
                raise SegcliError(err.message, "--" + err.where.replace("_", "-"), err.hint) from None
            raise

    from .workflows.prune import dtop_options

    layers = _guard(ctx, flagged, api.parse_layers, exit_layers)
    _guard(ctx, flagged, dtop_options, p0, k, layers)  # the options first: a named model is not fetched in vain
    checkpoint = _guard(ctx, _checkpoint_or_model, checkpoint, model, _console(stderr=True))
    if model is not None and out is None:  # not into the model cache: where the user is
        out = Path(f"{model}_dtop.pt")
    result = _guard(ctx, flagged, api.prune, checkpoint, p0=p0, k=k, exit_layers=layers, out=out, overwrite=overwrite)
    path = result.checkpoint
    if json_out:
        typer.echo(json.dumps(result.to_dict()))
        return
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
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier run of this task in DIR/task{N}/."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout (progress goes to stderr)."),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
):
    """SegViT-CL: train one continual-learning step with every earlier parameter frozen (thesis 4.2.3)."""
    from . import api

    result = _guard(ctx, _train_reported, json_out,
                    lambda callback: api.cl_step(recipe, task, work_dir=work_dir, overrides=set_ or [], device=device,
                                                 resume=resume, callback=callback, overwrite=overwrite),
                    lambda: _command("segcli", "cl-step", recipe, "--task", task,
                                     *(["--work-dir", work_dir] if work_dir else []), "--resume", sets=set_, device=device),
                    lambda result: _closing_lines(result.iterations, result.metrics, str(result.checkpoint)))
    following = f"segcli cl-step --task {result.task + 1} --work-dir {result.work_dir.parent}"
    _train_summary(result, json_out, f"task {result.task}/{result.num_tasks} @ {result.iterations} iterations", [
        f"task {result.task}/{result.num_tasks}: learnt classes {list(result.classes)} on {result.num_images} images; "
        f"wrote {result.checkpoint}",
        *([f"next: {following}"] if result.task < result.num_tasks else []),
        f"eval: segcli eval {result.checkpoint} --json   (adds base/new/all mIoU and forgetting)"])


# --------------------------------------------------------------------------- data


@app.command()
def convert(
    ctx: typer.Context,
    source: Path = typer.Argument(..., help="A released checkpoint (.pth) of the official code or MMSegmentation."),
    from_: Optional[str] = typer.Option(None, "--from", help="segvit-v1 | segvit-v1-shrunk | dtop | mmseg | mmseg-vit (default: detected from the keys)."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", help="The architecture (default: the recipes/released/ one that the tensors' shapes fit)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output file (default beside SOURCE: <stem>.segcli.pt)."),
    set_: Optional[List[str]] = SetOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """Convert a released SegViT / MMSegmentation checkpoint into a segcli checkpoint (its recipe embedded)."""
    from . import api

    result = _guard(ctx, api.convert, source, from_format=from_, recipe=recipe, out=out, overwrite=overwrite,
                    overrides=set_ or [])
    if json_out:
        typer.echo(json.dumps(result.to_dict()))
        return
    if result.recipe is not None:
        _console().print(f"recipe {result.recipe} (the tensors say {result.architecture})")
    _console().print(f"wrote {result.path} ({result.format}: {result.tensors_in} tensors read, "
                     f"{result.tensors_out} written)")
    if result.format != "mmseg-vit":
        _console().print(f"next: segcli eval {result.path}   or   segcli predict IMAGE --checkpoint {result.path}")
    else:
        _console().print(f"use it as model.backbone.pretrained: --set model.backbone.pretrained={result.path}")


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


@data_app.command("show")
def data_show(
    ctx: typer.Context,
    recipe: Path = typer.Argument(..., help="Recipe YAML whose dataset to render."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder for <split>_<stem>.png overlays."),
    split: List[str] = typer.Option(["train"], "--split", help="train and/or val (repeatable)."),
    limit: Optional[int] = typer.Option(20, "--limit", help="Samples per split (0 or less is an error)."),
    all_: bool = typer.Option(False, "--all", help="Every sample (ignores --limit)."),
    opacity: float = typer.Option(0.5, "--opacity", help="Colour weight: 0 = image, 1 = colours."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace overlays of an earlier run."),
    set_: Optional[List[str]] = SetOpt,
):
    """Write ground-truth overlays with a class legend (like MMSegmentation's browse_dataset)."""
    from . import api

    def run():
        for name in split:
            if name not in ("train", "val"):
                raise SegcliError(f"unknown split '{name}'", "--split", "use train or val")
        return api.show_data(recipe, out, overrides=set_ or [], splits=tuple(dict.fromkeys(split)),
                             limit=None if all_ else limit, opacity=opacity, overwrite=overwrite)

    result = _guard(ctx, run)
    _console().print(f"wrote {len(result.written)} overlay(s) to {out}/")


@data_app.command("check")
def data_check(
    ctx: typer.Context,
    recipe: Path = typer.Argument(..., help="Recipe YAML whose dataset to check."),
    set_: Optional[List[str]] = SetOpt,
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
):
    """Read every image and mask of every split once; report every problem and the class histogram."""
    from rich.progress import Progress

    from . import api

    err = _console(stderr=True)
    with Progress(console=err, transient=True, disable=not err.is_terminal) as bar:
        tasks: dict[str, int] = {}

        def progress(split: str, done: int, total: int) -> None:
            if split not in tasks:
                tasks[split] = bar.add_task(f"check {split}", total=total)
            bar.update(tasks[split], completed=done)

        report = _guard(ctx, api.check_data, recipe, overrides=set_ or [], progress=progress)
    if json_out:
        typer.echo(json.dumps(report.to_dict()))
    else:
        console = _console()
        console.print(", ".join(f"{split}: {n} images" for split, n in report.images.items()))
        total = sum(report.pixels) + report.ignored_pixels
        table = Table(title="class histogram (labelled pixels)")
        table.add_column("id", justify="right")
        table.add_column("class")
        table.add_column("pixels", justify="right")
        table.add_column("%", justify="right")
        for i, (name, count) in enumerate(zip(report.classes, report.pixels)):
            table.add_row(str(i), escape(name), str(count), f"{100 * count / max(total, 1):.2f}")
        table.add_row("255", "(ignore)", str(report.ignored_pixels), f"{100 * report.ignored_pixels / max(total, 1):.2f}")
        console.print(table)
        for where, problem in report.problems:
            err.print(f"[bold red]problem:[/] {escape(f'{where}: {problem}')}")
        console.print("no problems" if report.ok else f"{len(report.problems)} problem(s)")
    if not report.ok:
        raise typer.Exit(2)



@data_app.command("prepare")
def data_prepare(
    ctx: typer.Context,
    dataset: str = typer.Argument(..., help="cityscapes, coco_stuff10k, pascal_context (or pascal_context_59) or ade20k."),
    src: Path = typer.Argument(..., help="The download: extracted, or as downloaded (the Cityscapes zips' folder, the COCO-Stuff zip); never written to."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder: the data.root of the recipe (ade20k: not needed)."),
    copy: bool = typer.Option(False, "--copy", help="Copy images instead of hard-linking them."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write every file again (a rerun into the same --out resumes without it)."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout (progress and notes go to stderr)."),
):
    """Write a dataset's layout from its raw download (resumable); check an ADE20K download."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from . import api

    err = _console(stderr=True)
    with Progress(TextColumn(f"prepare {escape(dataset)}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("prepare", total=None)
        result = _guard(ctx, api.prepare_data, dataset, src, out, overwrite=overwrite, copy=copy,
                        progress=lambda done, total: bar.update(task, completed=done, total=total))
    console = _console()
    for where, problem in result.problems:
        err.print(f"[bold red]problem:[/] {escape(f'{where}: {problem}')}")
    for note in result.notes:
        err.print(f"note: {escape(note)}")
    if json_out:
        typer.echo(json.dumps(result.to_dict()))
        if not result.ok:
            raise typer.Exit(2)
        return
    splits = ", ".join(f"{split}: {n}" for split, n in result.samples.items())
    if not result.ok:
        console.print(f"{len(result.problems)} problem(s) in {result.root} ({splits} images)")
        raise typer.Exit(2)
    done = f"wrote {result.written} files" + (f", kept {result.skipped} from an earlier run" if result.skipped else "")
    console.print(f"{'ready as it is' if result.checked_only else done}: {result.root} ({splits} images)")
    console.print(f"next: segcli data check RECIPE --set data.root={result.root}   "
                  f"(a recipe with data.type {' or '.join(result.data_types)})")

# --------------------------------------------------------------------------- recipe, plot

recipe_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Recipe utilities.")
app.add_typer(recipe_app, name="recipe")


@recipe_app.command("show")
def recipe_show(
    ctx: typer.Context,
    recipe: Path = typer.Argument(..., help="Recipe YAML."),
    set_: Optional[List[str]] = SetOpt,
    gpus: Optional[int] = typer.Option(None, "--gpus", min=1, help="Compare with the published experiment for a run on N GPUs (default 1)."),
):
    """Print the resolved recipe (bases merged, --set applied, defaults filled): what train writes.

    A recipe that names its published experiment starts with comment lines marking each way a run
    of it (on --gpus GPUs, CUDA) differs from that experiment."""
    from . import api

    shown = _guard(ctx, api.show_recipe, recipe, overrides=set_ or [], gpus=gpus)
    check = shown.check
    if check.published is not None:
        assumed = ", ".join(shown.assumed)
        lines = [f"# published experiment: {check.summary()}"]
        if check.matches:
            lines.append(f"# a run on {assumed} is the published experiment")
        else:
            lines.append(f"# a run on {assumed} differs from it:")
            lines += [f"#   differs: {line}" for line in check.differences]
        typer.echo("\n".join(lines))
    typer.echo(shown.yaml, nl=False)


@app.command()
def plot(
    ctx: typer.Context,
    run_dir: Path = typer.Argument(..., help="A work dir of `segcli train` (its metrics.jsonl)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output PNG (default RUN_DIR/curves.png)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output PNG."),
):
    """Draw the loss and validation mIoU curves of a run into a PNG."""
    from . import api

    path = _guard(ctx, api.plot_run, run_dir, out=out, overwrite=overwrite)
    _console().print(f"wrote {path}")


# --------------------------------------------------------------------------- export


@app.command()
def export(
    ctx: typer.Context,
    checkpoint: Optional[Path] = typer.Argument(None, help="A segcli checkpoint."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    format_: str = typer.Option("onnx", "--format", "-f", help="onnx, torchscript or exported-program."),
    shape: Optional[Tuple[int, int]] = typer.Option(None, "--shape", help="Input H W (default: the crop size)."),
    dynamic: bool = typer.Option(False, "--dynamic", help="Dynamic batch, height and width where the model allows."),
    batch: int = typer.Option(1, "--batch", help="Batch size of the graph (the sample batch if --dynamic)."),
    output: str = typer.Option("labels", "--output", help="labels (int64 [B,H,W]) or scores ([B,K,H,W])."),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset (default 18)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output file (default beside the checkpoint; with --model: NAME.<format> here)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
):
    """Export a checkpoint (image 0..255 RGB NCHW in) and check it against PyTorch on a sample input."""
    from . import api

    from .workflows.export import check_options, default_out

    # the options first: a named model is not fetched for options that would be refused
    _guard(ctx, check_options, format_, output, tuple(shape) if shape else None, batch, opset, dynamic)
    checkpoint = _guard(ctx, _checkpoint_or_model, checkpoint, model, _console(stderr=True))
    if model is not None and out is None:  # not into the model cache: where the user is
        out = default_out(Path(f"{model}.pt"), format_)

    result = _guard(ctx, api.export, checkpoint, format=format_, shape=tuple(shape) if shape else None,
                    dynamic=dynamic, batch=batch, output=output, opset=opset, out=out, overwrite=overwrite)
    if json_out:
        typer.echo(json.dumps(result.to_dict()))
        return
    console = _console()
    axes = ", ".join(result.dynamic_axes) or "none (static)"
    console.print(f"wrote {result.path} ({result.format}{f', opset {result.opset}' if result.opset else ''}, "
                  f"{result.output}, {result.export_seconds:.1f} s; dynamic axes: {axes})")
    for check in result.checks:
        diff = "-" if check.max_abs_diff is None else f"{check.max_abs_diff:.3g} (relative {check.rel_diff:.2g})"
        console.print(f"  input {list(check.shape)}: max abs diff {diff}, labels agree on {check.label_agreement:.4%}")


# --------------------------------------------------------------------------- zoo


def _published(numbers: dict, key: str) -> str:
    """The single-scale mIoU (``mIoU``, ``mIoU59``) or the GFLOPs of a row's published numbers."""
    for name, value in numbers.items():
        if (name.startswith(key) and "(ms)" not in name) if key == "mIoU" else name == key:
            return f"{value:.1f}"
    return "-"


@zoo_app.command("list")
def zoo_list(
    ctx: typer.Context,
    json_out: bool = typer.Option(False, "--json", help="Print a JSON list on stdout."),
):
    """Named models for --model: description, published mIoU and GFLOPs, and whether each is cached."""
    from . import api

    rows = _guard(ctx, api.list_models)
    if json_out:
        typer.echo(json.dumps([row.to_dict() for row in rows]))
        return
    table = Table(title="segcli zoo (published figures; --model NAME)")
    for column, justify in (("name", "left"), ("model", "left"), ("mIoU", "right"), ("GFLOPs", "right"),
                            ("cached", "left")):
        table.add_column(column, justify=justify, no_wrap=column != "model")
    for row in rows:  # cached: the segcli checkpoint; "hub file": only the released file (converts offline)
        if row.cached:
            cached = "yes"
        elif row.released_cached:
            cached = "hub file"
        else:
            cached = "no" if row.released_cached is not None else "train it"
        table.add_row(escape(row.name), escape(row.description), _published(row.numbers, "mIoU"),
                      _published(row.numbers, "GFLOPs"), cached)
    console = _console()
    console.print(table)
    console.print(f"cache: {escape(str(Path(rows[0].checkpoint).parent)) if rows else '-'} (\"hub file\": only the "
                  "released file is cached, it converts offline); figures: each model's recipe (published:)")


@zoo_app.command("fetch")
def zoo_fetch(
    ctx: typer.Context,
    names: List[str] = typer.Argument(..., metavar="NAME", help="Model names (`segcli zoo list`)."),
    json_out: bool = typer.Option(False, "--json", help="Print {name: cached checkpoint} as JSON on stdout."),
):
    """Download and convert named models now, so that --model NAME works offline later."""
    from . import api

    console = _console(stderr=True)
    paths = _guard(ctx, api.fetch_models, list(names), progress=_DownloadReporter(console),
                   notify=lambda line: console.print(escape(line)))
    if json_out:
        typer.echo(json.dumps({name: str(path) for name, path in paths.items()}))
        return
    for name, path in paths.items():
        _console().print(escape(f"{name}: {path}"))


def main() -> None:
    # torch's C++-extension helper, which --compile imports, logs "No CUDA runtime is found, using
    # CUDA_HOME=..." on a CPU-only machine with a CUDA toolkit: nothing a user can act on.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    app()


if __name__ == "__main__":
    main()
