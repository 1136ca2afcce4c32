"""Set up the demo: five photos of a held-out toy-world concept (a red striped dog, never seen by
the shipped base model) and a one-concept CustomConcept101-format dataset around them."""

from __future__ import annotations

import sys
from pathlib import Path

from persres.toyworld.dataset import write_cc101
from persres.toyworld.experiment import reference_photos
from persres.toyworld.scenes import HELD_OUT

CONCEPT = HELD_OUT[0]  # ("dog", "red", "striped")
DEMO_PROMPTS = (  # one prompt of each of the supplement's six kinds, in CustomConcept101's {} form
    "a photo of {}",
    "{} on the beach",
    "a blue {}",
    "a painting of {}",
    "{} with a ball",
    "a cup in the style of {}",
)


def main(out: str) -> None:
    root = Path(out)
    photos = reference_photos(CONCEPT, root / "photos", count=5)
    write_cc101(root / "cc101", [(CONCEPT, photos, list(DEMO_PROMPTS))])
    print(f"5 photos of a {' '.join(CONCEPT[1:])} {CONCEPT[0]} in {photos}; dataset in {root / 'cc101'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "demo-output")
