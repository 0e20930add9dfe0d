"""What a model declares it can be exported as (``segcli export``).

As segmentation_models_pytorch's ``_is_torch_exportable``, exportability is a property a model
states, not something the exporter finds out by matching the text of a tracing error: every
backbone, decode head and segmentor answers ``export_support()``, a segmentor combines its own
answer with those of the parts its inference runs (``a & b``), and the export workflow reads the
combination before it captures anything, so a refusal is one line that names the recipe key and
the fix, and nothing is written.

Two capabilities, because every export format goes through one ``torch.export`` capture
(ONNX and ``.pt2``) or one trace (TorchScript):

* ``graph``: a static graph computes what the eager model computes. False where which tokens are
  computed depends on the pixel values (DToP with p0 < 1, Shrunk with EQD): a capture would need
  a graph break, and a trace would freeze the token set of the sample image.
* ``dynamic``: the graph stays faithful with dynamic batch, height and width. False where the
  code turns a size into a Python int that the capture then fixes (NRD's patch grid).

A declaration says what is known not to work; the exporter still verifies every file against
the eager model, so an optimistic declaration is caught there (the file is kept aside as
``.unverified``), never shipped.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExportSupport:
    graph: bool = True  # a static graph is faithful (every format)
    dynamic: bool = True  # ... with dynamic batch / height / width too (ONNX, exported-program)
    reason: str = ""  # why not: what in the model prevents it
    key: str = ""  # the recipe key that decides it
    fix: str = ""  # what to do instead

    def __post_init__(self):
        if not (self.graph and self.dynamic) and not self.reason:
            raise ValueError("a declared limit needs its reason")
        if not self.graph and self.dynamic:
            object.__setattr__(self, "dynamic", False)  # no graph, no dynamic graph

    def __and__(self, other: ExportSupport) -> ExportSupport:
        """Both parts run in the exported graph: it supports what both support; the reason is the
        first part's that limits most (no graph before no dynamic graph)."""
        limits = [s for s in (self, other) if not s.graph] or [s for s in (self, other) if not s.dynamic]
        first = limits[0] if limits else ExportSupport()
        return ExportSupport(self.graph and other.graph, self.dynamic and other.dynamic, first.reason, first.key,
                             first.fix)


FULL = ExportSupport()


def data_dependent(what: str, key: str, fix: str) -> ExportSupport:
    """No faithful graph: ``what`` decides the computed token set from the image."""
    return ExportSupport(graph=False, dynamic=False, reason=f"{what}: which tokens it computes depends on the image "
                         "(a data-dependent token set), which a static graph cannot hold", key=key, fix=fix)


def static_only(reason: str) -> ExportSupport:
    """A faithful static graph, but no dynamic one: ``reason`` says what a capture fixes."""
    return ExportSupport(dynamic=False, reason=reason, key="--dynamic", fix="export without --dynamic, at the --shape you run")


__all__ = ["ExportSupport", "FULL", "data_dependent", "static_only"]
