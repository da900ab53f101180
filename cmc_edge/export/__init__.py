"""Export stage: a delta training checkpoint -> a self-describing ONNX bundle (fp32 + INT8).

``onnx`` exports and validates the graph (torch), ``quantize`` makes and checks the INT8
variant, ``bundle`` puts them together atomically with a manifest. Importing this package
imports nothing heavy; torch is loaded by the functions that need it.
"""

from cmc_edge.export.bundle import Checkpoint, export_bundle, read_checkpoint

__all__ = ["Checkpoint", "export_bundle", "read_checkpoint"]
