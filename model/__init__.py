"""Training side of cellgate: the gated LSTM, its vocabulary, corpora, training and evaluation."""
