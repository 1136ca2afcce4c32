"""A toy world learnable on a CPU: procedural scenes with known truth, a small text-to-image model
trained on them (``models/toyworld-base``), and oracle scorers that know what each image should be.

Four modules here have an argparse ``main()``: ``train_base``, ``train_oracle``, ``oracle_check`` and
``demo``. They stay ``python -m persres.toyworld.X`` modules rather than moving to ``scripts/``: the
models' cards cite those commands as the way each shipped model was made; ``train_base`` is also a
library (tests import its ``BaseTrainConfig``, ``train_unet`` and ``train_vae``); and ``python -m`` runs
them alike from a checkout and from an install, without a ``sys.path`` edit. They cost ``import
persres`` nothing: no library module imports them. The shipped models themselves are not in the package
(36 MB): ``persres.toymodels`` says where they are found.
"""
