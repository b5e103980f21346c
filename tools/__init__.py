"""The tools around the model: benchmarks, sizing, loss plots, the GPU compile check. Each runs as
`python tools/NAME.py` (or `python -m tools.NAME`) and imports the model's modules from the folder above."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: train.py, configs/
