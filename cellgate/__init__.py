"""cellgate: stateful next-word prediction with a gated LSTM."""
