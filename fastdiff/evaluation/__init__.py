"""Sample quality as ADM's evaluator scores it (FID, sFID, IS, precision, recall), without TensorFlow.

``metrics`` holds the math; ``networks`` the feature networks (the FID Inception-v3, loaded from
a weights file, and the bundled MNIST CNN); ``npz`` reads reference batches and sample files.
"""
