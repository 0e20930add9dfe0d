"""Workflows: what a command does, end to end (train, evaluate, predict, flops, prune, continual steps).

Each workflow builds what it needs with :mod:`segcli.build` and runs the engine; none imports
:mod:`segcli.api` (which re-exports them) or the CLI. Workflows return values and report progress
through callbacks; they never print.
"""
