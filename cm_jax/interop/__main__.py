"""Import released PyTorch checkpoints into run directories; export runs to other formats.

  python -m cm_jax.interop import --source openai --checkpoint cd_imagenet64_lpips.pt \
      --preset imagenet64 --workdir runs/cd_in64_openai              # --method from the name
  python -m cm_jax.interop import --source edm --checkpoint edm-cifar10-32x32-uncond-ve.pkl \
      --preset cifar10-ncsnpp --workdir runs/edm_cifar10_ve
  python sample.py --workdir runs/cd_in64_openai --num 64 --steps 1 --out cd.npz

  python -m cm_jax.interop export --workdir runs/cd_in64_openai --format diffusers --out hf/cd
  python -m cm_jax.interop export --workdir runs/x --format safetensors --out export/x
  python -m cm_jax.interop export --workdir runs/x --format openai --out export/x/model.pt
  python -m cm_jax.interop export --workdir runs/sd15_lcd --format diffusers --out hf/lcm
  python -m cm_jax.interop export --workdir runs/sd15_lcm_lora --format lora --out hf/lora

An imported run holds the weights in its online params, every EMA copy and the target,
saved at --step (default 0) with the config of configs/<data>_<method>.py adapted to the
released network; it is used as any run: sample.py, evaluate.py, or as a CD teacher
(--config.method.teacher_workdir=<workdir>, with the teacher's c_noise). openai .pt files
are read with torch.load(weights_only=True); EDM .pkl files with a restricted unpickler
that never runs the code stored in them (cm_jax/interop/edm_import.py).
"""
from __future__ import annotations

import argparse
import os
import pickle
import sys

from absl import logging


def _import(args) -> None:
  from cm_jax.interop import edm_import, name_maps, openai_import, presets, runs  # pylint: disable=g-import-not-at-top
  source = {"source": args.source, "checkpoint": os.path.abspath(args.checkpoint)}
  if args.source == "openai":
    presets.check_source(args.preset, "openai")
    method = args.method or presets.method_from_filename(args.checkpoint)
    if method is None:
      raise ValueError("cannot tell the method from the file name; pass --method edm|cd|ct")
    state = openai_import.load_torch_state_dict(args.checkpoint)
    config = presets.build_config(args.preset, "openai", method,
                                  num_classes=openai_import.num_classes_in(state),
                                  variant=args.variant, teacher_workdir=args.teacher_workdir)
    presets.apply_overrides(config, args.set)
    flat = openai_import.adm_params_from_openai(state, config.model, args.qkv_layout)
    notes = []
  else:
    method = args.method or "edm"
    presets.check_source(args.preset, "edm")
    desc, state = edm_import.load_edm_network(args.checkpoint)
    edm_import.check_precond(desc)
    fam = presets.family(args.preset)
    want_arch = "SongUNet" if fam == "cifar10" else "DhariwalUNet"
    if desc["arch"] != want_arch:
      raise ValueError(f"the checkpoint's network is {desc['arch']}; preset {args.preset!r} "
                       f"expects {want_arch}")
    if desc["arch"] == "SongUNet":
      kind = "cifar10-ncsnpp" if "model.map_noise.freqs" in state else "cifar10-ddpmpp"
      if kind != args.preset:
        raise ValueError(f"the checkpoint is a {kind.split('-')[1].upper()} network: use "
                         f"--preset {kind}")
    config = presets.build_config(args.preset, "edm", method, num_classes=desc["label_dim"],
                                  sigma_data=desc["sigma_data"], variant=args.variant)
    presets.apply_overrides(config, args.set)
    size = int(config.data.image_size)
    if desc["img_resolution"] and desc["img_resolution"] != size:
      raise ValueError(f"the checkpoint is for {desc['img_resolution']}px images; the config "
                       f"says {size}")
    if desc["arch"] == "SongUNet":
      m = config.model
      taps = m.get("fir_kernel", (1, 3, 3, 1)) if m.get("resample", "fir") == "fir" else (1, 1)
      edm_import.check_resample_filters(state, taps)
      flat, dropped = edm_import.song_params(state)
    else:
      flat, dropped = edm_import.dhariwal_params(state, config.model, size)
    notes = [f"dropped {k}" for k in dropped]
    source.update(precond=desc["precond"], arch=desc["arch"])
  path = runs.save_imported_run(args.workdir, name_maps.unflatten(flat), config, args.step,
                                source)
  for n in notes:
    print(f"note: {n} (EDM's augmentation-label input; unused when sampling)")
  print(f"imported {os.path.basename(args.checkpoint)} ({args.source}, {config.model.name}, "
        f"method {config.method.name}, c_noise {config.precond.c_noise}) into {path} at step "
        f"{args.step}; sample with: python sample.py --workdir {args.workdir} --num 64")


def _export(args) -> None:
  from cm_jax.interop import export_diffusers, export_openai, export_safetensors, runs  # pylint: disable=g-import-not-at-top
  from cm_jax import runs as run_dirs  # pylint: disable=g-import-not-at-top
  from cm_jax.interop import export_sd  # pylint: disable=g-import-not-at-top
  if args.format in ("diffusers", "lora"):  # an unsupported run: one line, no weights read
    config = run_dirs.load_config(args.workdir, args.step)
    if args.format == "lora" or config.method.name in export_sd.PIPELINES:
      export_sd.check_exportable(config, args.format)
  params, config, step, which = runs.load_run_params(args.workdir, args.params, args.step)
  if args.format == "safetensors":
    out = export_safetensors.save(args.out, params, config, which, extra={"step": int(step)})
  elif args.format == "lora":
    out = export_sd.save_lora(args.out, params, config)
  elif args.format == "diffusers" and config.method.name in export_sd.PIPELINES:
    out = export_sd.save(args.out, params, config)
  elif args.format == "diffusers":
    out = export_diffusers.save(args.out, params, config, which)
  else:
    out = export_openai.save(args.out, params, config.model, args.qkv_layout,
                             args.conv1d_attention)
  print(f"exported {which} params of step {step} of {args.workdir} as {args.format}: {out}")


def parser() -> argparse.ArgumentParser:
  from cm_jax.interop import presets  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(prog="python -m cm_jax.interop", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)
  imp = sub.add_parser("import", help="checkpoint -> run directory")
  imp.add_argument("--source", required=True, choices=presets.SOURCES)
  imp.add_argument("--checkpoint", required=True, help="openai .pt or EDM .pkl")
  imp.add_argument("--preset", required=True, choices=presets.PRESETS)
  imp.add_argument("--method", choices=presets.METHODS, default=None,
                   help="edm | cd | ct (openai: default from the file name; EDM: edm)")
  imp.add_argument("--workdir", required=True)
  imp.add_argument("--step", type=int, default=0, help="step to save the imported state at")
  imp.add_argument("--qkv_layout", default="three_heads", choices=("three_heads", "heads_three"),
                   help="openai attention qkv order: three_heads (consistency_models) or "
                        "heads_three (guided-diffusion legacy)")
  imp.add_argument("--teacher_workdir", default="", help="--method cd: the EDM teacher run")
  imp.add_argument("--variant", default="", help="config variant ('tiny' for tests)")
  imp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set data.data_dir=/data (repeatable)")
  exp = sub.add_parser("export",
                       help="run directory -> safetensors | diffusers | openai | lora")
  exp.add_argument("--workdir", required=True)
  exp.add_argument("--format", required=True,
                   choices=("safetensors", "diffusers", "openai", "lora"),
                   help="diffusers: a pipeline folder (ldm: StableDiffusionPipeline; lcd / "
                        "lcf: LatentConsistencyModelPipeline); lora: an LCM-LoRA run's "
                        "adapters as pytorch_lora_weights.safetensors")
  exp.add_argument("--out", required=True, help="output directory (openai: a .pt path or dir; "
                   "lora: a .safetensors path or dir)")
  exp.add_argument("--params", default=None,
                   help="ema | online | an EMA's name (default: the config's sample.params)")
  exp.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  exp.add_argument("--qkv_layout", default="three_heads", choices=("three_heads", "heads_three"))
  exp.add_argument("--conv1d_attention", action="store_true",
                   help="openai: write attention convs as Conv1d (guided-diffusion)")
  return p


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  logging.set_verbosity(logging.ERROR)  # Orbax logs every file it writes
  try:
    (_import if args.command == "import" else _export)(args)
  except (ValueError, FileNotFoundError, FileExistsError, pickle.UnpicklingError) as e:
    print(f"cm_jax.interop {args.command}: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
