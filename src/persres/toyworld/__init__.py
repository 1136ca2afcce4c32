"""A toy world learnable on a CPU: procedural scenes with known truth, a small text-to-image model
trained on them (``models/toyworld-base``), and oracle scorers that know what each image should be."""
