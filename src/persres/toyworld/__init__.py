"""A toy world learnable on a CPU: procedural scenes with known truth, a small text-to-image model
trained on them (``models/toyworld-base``), and oracle scorers that know what each image should be.

Five modules here have an argparse ``main()``: ``train_base``, ``train_flux_base``, ``train_oracle``,
``oracle_check`` and ``demo``. They stay ``python -m persres.toyworld.X`` modules rather than moving to
``scripts/``: the models' cards cite those commands as the way each shipped model was made; the two base
trainers are also libraries (tests import their configs and stage functions; both run on the shared
loop of ``persres.toyworld.training``); and ``python -m`` runs
them alike from a checkout and from an install, without a ``sys.path`` edit. They cost ``import
persres`` nothing: no library module imports them. The shipped models themselves are not in the package
(36 MB): ``persres.toymodels`` says where they are found.
"""
