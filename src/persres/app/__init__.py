"""``persres app``: a browser UI over the library (train, sample normal | LAG | both, runs, export).

``runstore`` names run folders and keeps every path inside ``--runs``; ``photos`` checks and keeps
uploads; ``jobs`` runs training and sampling, one job at a time on the machine; ``masks`` draws LAG's
masks over an image; ``ui`` builds the gradio page. Only ``ui`` (and ``persres app``) import gradio.
"""
