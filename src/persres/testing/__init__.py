"""Tiny pipelines and published model configs, for tests, benchmarks and the meta-device checks.

``tiny`` builds Stable Diffusion 1.x/XL pipelines of a few thousand parameters with the same diffusers
and transformers classes a real base uses; ``reference_configs`` holds the published configs of the
real bases (nothing here downloads weights). It imports only the root.
"""
