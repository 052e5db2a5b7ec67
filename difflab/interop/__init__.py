"""difflab.interop: foreign models in, our checkpoints out.

- `difflab.interop.diffusers`: Hugging Face diffusers UNets as difflab networks and denoisers,
  with difflab's attention hooks (`DiffusersUNet`, `diffusers_denoiser`). diffusers itself is
  imported only by the caller who builds the UNet.
"""
