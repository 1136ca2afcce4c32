"""Using what was learned: sampling normally or with localized attention guidance (``sampling``), the
files it writes apart from its inputs (``outputs``), a result folded into a base model's weights
(``merge``) and a base with every concept of a list loaded (``personalized``). It imports everything
below it (root, ``backbones``, ``core``, ``formats``, ``methods``), never training or evaluation.
"""
