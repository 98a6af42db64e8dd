"""digits: handwritten-digit recognition in JAX, with hand-derived backprop checked against jax.grad."""
