"""ONNX in and out (`pip install 'pocketfed[onnx]'`); the onnx package is imported only when used.

model = engine.load("lenet.onnx")          # = import_onnx: a Model with named weights
... train it with engine.trainer.Trainer ...
export_onnx(model, "lenet-tuned.onnx")      # the inference graph, runnable by onnxruntime
export_training_step(model, "step.onnx", optimizer="adam")   # one training step, any ONNX runtime
"""

from .exporter import EMITTERS, export_onnx
from .importer import CONVERTERS, OnnxError, import_onnx
from .lowerings import LOWERINGS, lowering
from .training_step import export_training_step

__all__ = [
    "CONVERTERS",
    "EMITTERS",
    "LOWERINGS",
    "OnnxError",
    "export_onnx",
    "export_training_step",
    "import_onnx",
    "lowering",
]
