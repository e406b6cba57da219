"""Serving side of cellgate: FastAPI on ONNX Runtime. Never imports torch."""
