"""The importable surface of segcli: what the CLI calls, and what notebooks and scripts call.

Nothing is implemented here: each name is re-exported from the module that owns it (the
workflows in ``segcli/workflows/``, the builders in ``segcli/build.py``, recipes in
``segcli/recipe.py``). Every function takes typed inputs by keyword, returns values and never
prints; long operations report progress through an optional callback. User errors raise
:class:`segcli.errors.SegcliError`.
"""
from __future__ import annotations

from .build import LoadedModel, build_datasets, build_model, load_checkpoint, pick_device, without_pretrained
from .onnx_model import load_onnx
from .recipe import Recipe, dump_recipe, load_recipe, resolved_recipe_yaml
from .workflows.benchmark import benchmark
from .workflows.continual import CLStepResult, cl_metrics, cl_step
from .workflows.data_check import DataCheckResult, check_data
from .workflows.data_prepare import PrepareResult, prepare_data
from .workflows.data_show import DataShowResult, show_data
from .workflows.convert import ConvertResult, convert
from .workflows.evaluate import evaluate
from .workflows.experiment import ExperimentCheck, RecipeShow, compare_to_published, show_recipe
from .workflows.export import ExportResult, export_model
from .workflows.flops import flops
from .workflows.plot import plot_run
from .workflows.predict import PredictResult, predict
from .workflows.prune import PruneResult, gflops_split, parse_layers, prune, prune_checkpoint
from .workflows.released import ZooRow, fetch_models, list_models, resolve_model
from .workflows.segmenter import Segmenter
from .workflows.train import TrainResult, train


export = export_model  # ``segcli export``: ONNX / ExportedProgram / TorchScript, verified


__all__ = ["CLStepResult", "ConvertResult", "convert", "LoadedModel", "PredictResult", "Recipe", "TrainResult", "build_datasets", "build_model",
           "cl_metrics", "cl_step", "dump_recipe", "evaluate", "flops", "gflops_split", "load_checkpoint",
           "load_recipe", "pick_device", "predict", "prune", "PruneResult", "prune_checkpoint", "train", "without_pretrained",
           "DataCheckResult", "check_data", "PrepareResult", "prepare_data", "plot_run", "resolved_recipe_yaml",
           "ExportResult", "export", "export_model", "load_onnx", "benchmark", "Segmenter", "DataShowResult", "show_data",
           "ExperimentCheck", "RecipeShow", "compare_to_published", "show_recipe",
           "ZooRow", "fetch_models", "list_models", "resolve_model"]
