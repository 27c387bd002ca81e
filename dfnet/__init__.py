"""DFNet (Deep Fusion Network for Image Completion, ACM MM 2019) in PyTorch.

Modules: `model` (the network, presets, model files), `official` (the authors' checkpoints),
`losses`, `masks`, `metrics`, `data`, `corpus` (the Debian photo corpus), `inpaint` (the
`Inpainter` for photos of any size), `training` (the shared training step), `accelerate` and
`fast_decoder` (faster inference), `params` (params.yaml) and `cli` (the `dfnet` command). No Ray
or MLflow imports here: those live in pipelines/, tune/ and serve/.
"""

__version__ = "0.1.0"
