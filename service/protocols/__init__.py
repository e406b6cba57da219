"""Wire formats of the protocols other than cellgate's own: request and response bodies, tensor codecs."""
