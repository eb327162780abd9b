"""The model's way out of training: INT8 quantization, export to a model package behind the accuracy
gate, latency benchmarks (timing), and the way reviewed parts come back (review-export). Imports
training.core, never training.demo.
"""
