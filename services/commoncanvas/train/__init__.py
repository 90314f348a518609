"""The TrainRun stage: Stable Diffusion 2 training on the captioned CC catalog.

`python -m commoncanvas.train FILE.yaml` is one training process (see __main__); `loop.train` is the
training loop; data, model, checkpoint and datacard hold its parts; latents is the optional phase that
precomputes the encoders' outputs; launch builds the TorchX app that runs the processes.
"""
