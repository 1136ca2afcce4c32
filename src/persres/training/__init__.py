"""Learning a concept: the training loop shared by every method (``train``), what it sets up before the
first step (``trainsetup``), its photos (``data``), checkpoints and resume (``checkpoint``), prior images
for the methods that want them (``prior``), validation grids (``validation``) and the loss log
(``trainlog``). It imports everything below it; only evaluation and the front ends import it.
"""
