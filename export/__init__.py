"""Export side of cellgate: ONNX graphs that carry (h, C), parity checks and the model bundle."""
