"""Checkpoint interop: import the released PyTorch checkpoints, export runs to other formats.

  openai_import      openai/consistency_models (guided-diffusion) UNetModel .pt -> ADMUNet
  edm_import         NVlabs/edm .pkl via a restricted unpickler -> NCSNppUNet / ADMUNet
  name_maps          the torch <-> Flax names, layouts and qkv orders, all exact
  export_safetensors Flax-path keys + config JSON
  export_diffusers   UNet2DModel + scheduler directory (ConsistencyModelPipeline)
  export_openai      UNetModel state dict .pt
  presets, runs      run configs of the released nets; Orbax run directories
  __main__           python -m cm_jax.interop import|export
"""
