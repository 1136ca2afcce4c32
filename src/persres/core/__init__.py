"""The method's parts that hold for every base: residual layers (``residuals``), the attention capture and
localized attention-guided masks (``attention``, ``lag``), tokens and placeholders (``tokens``), and
loading a base pipeline and conditioning a prompt through its backbone (``pipeline``, ``conditioning``).
It imports the root and ``backbones``, which tells it where a base's layers are.
"""
