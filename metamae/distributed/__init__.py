"""Ray at the edges: Ray Data streaming (and, later, Ray Train) around the pure-PyTorch library."""
