"""The training pipeline: read the CSV, type the columns, prepare the split, search the
candidates, export and check ONNX, analyse and render the version report.

pandas, scikit-learn, skl2onnx and matplotlib live here and in nothing the predict function imports."""
