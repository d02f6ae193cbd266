"""ONNX in and out (`pip install 'pocketfed[onnx]'`); the onnx package is imported only when used.

model = engine.load("lenet.onnx")          # = import_onnx: a Model with named weights
... train it with engine.trainer.Trainer ...
export_onnx(model, "lenet-tuned.onnx")      # the inference graph, runnable by onnxruntime
"""

from .exporter import EMITTERS, export_onnx
from .importer import CONVERTERS, OnnxError, import_onnx

__all__ = ["CONVERTERS", "EMITTERS", "OnnxError", "export_onnx", "import_onnx"]
