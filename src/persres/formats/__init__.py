"""What persres writes and reads on disk: the residual file (``header`` reads and checks it without torch,
``io`` saves and loads it, ``info`` describes it), LoRA files for other tools (``lora_files``), the run
folder (``runfolder``, the one owner of its names) and the list of runs (``runs``), and a result loaded
as a concept to sample (``concepts``). It imports the root, ``backbones`` and ``core``.
"""
