"""Start-up time of commands that only read files, against the cost of importing torch.

``persres info`` on a residual file (SD 1.5 layout: 16 layers at rank 0.05 m_i, written with random
factors) and on a missing file, ``persres --help`` and ``persres train --help``, each a fresh
process, measured interleaved in one run (median of --repeats); ``python -c "import torch"`` is the
floor a command would pay if it imported torch. Target: ``persres info`` well under 1 s.

    python bench/cli_startup.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PERSRES = [sys.executable, "-m", "persres"]


def write_residual_file(folder: Path) -> Path:
    """A residual file with the SD 1.5 layout, built on the meta device (no weights)."""
    script = f"""
import torch
from diffusers import UNet2DConditionModel
from persres import add_residuals, find_residuals, save_residuals
from persres.testing.reference_configs import SD15_UNET
with torch.device("meta"):
    unet = UNet2DConditionModel(**SD15_UNET)
add_residuals(unet)
for wrapper in find_residuals(unet).values():
    wrapper.A = torch.nn.Parameter(torch.randn(wrapper.A.shape))
    wrapper.B = torch.nn.Parameter(torch.randn(wrapper.B.shape))
save_residuals(unet, {str(folder / "residuals.safetensors")!r}, token="sks", class_word="dog",
               base_model="stable-diffusion-v1-5")
"""
    subprocess.run([sys.executable, "-c", script], check=True)
    return folder / "residuals.safetensors"


def seconds(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, capture_output=True, check=False)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        residuals = write_residual_file(Path(tmp))
        commands = {
            "persres info FILE": [*PERSRES, "info", str(residuals)],
            "persres info MISSING": [*PERSRES, "info", str(Path(tmp) / "missing.safetensors")],
            "persres --help": [*PERSRES, "--help"],
            "persres train --help": [*PERSRES, "train", "--help"],
            'python -c "import torch"': [sys.executable, "-c", "import torch"],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.repeats):  # interleaved: a noisy machine slows every command alike
            for name, command in commands.items():
                times[name].append(seconds(command))
    floor = statistics.median(times['python -c "import torch"'])
    print(f"| command | median s | vs import torch | (repeats: {args.repeats})")
    print("|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| `{name}` | {median:.3f} | {median / floor:.2f} |")


if __name__ == "__main__":
    main()
