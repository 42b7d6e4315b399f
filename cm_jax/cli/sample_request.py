"""The sampling flags sample.py and evaluate.py share, checked the same way in both.

Every check here runs before any weights are read or anything is compiled, and fails with
a `RequestError` whose text is the one line the script prints.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence


class RequestError(ValueError):
  """A flag value the run cannot honour; its message names the flag."""


def check_counts(**named: Optional[int]) -> None:
  """Each given count (None: not given) must be >= 1; the keyword is the flag's name."""
  for name, value in named.items():
    if value is not None and value < 1:
      raise RequestError(f"--{name} must be >= 1, got {value}")


def check_class_label(label: Optional[int], num_classes: int) -> None:
  if label is None:
    return
  if num_classes <= 0:  # [0, 0) would be the range, which reads as nonsense
    raise RequestError(f"--class_label {label}: this run is unconditional "
                       f"(data.num_classes = 0); it cannot be asked for a class")
  if not 0 <= label < num_classes:
    raise RequestError(f"--class_label must be in [0, {num_classes}) for this run, "
                       f"got {label}")


def parse_ts(values: Sequence[str], config, grid_points: Optional[int]) -> tuple[int, ...]:
  """--ts as grid indices of CM Algorithm 1, checked against the grid it indexes."""
  # pylint: disable-next=g-import-not-at-top
  from cm_jax.methods import cm_sampling
  if "ts" not in config.sample:
    raise RequestError(f"--ts applies to consistency models (cd, ct, ict) only; this run's "
                       f"method is {config.method.name!r}")
  try:
    ts = [int(v) for v in values]
  except ValueError:
    raise RequestError(f"--ts must be integer grid indices, e.g. 0,22,39; got "
                       f"{','.join(values)}") from None
  grid = int(grid_points or config.sample.get("grid_points", 0) or 40)
  try:
    return cm_sampling.check_ts(ts, grid)
  except ValueError as e:
    raise RequestError(f"--ts: {e}") from None


def check_metrics(names: Sequence[str], known: Sequence[str]) -> list[str]:
  """evaluate.py's --metrics, stripped; unknown or none is an error naming the known ones."""
  metrics = [m.strip() for m in names if m.strip()]
  unknown = [m for m in metrics if m not in known]
  if unknown or not metrics:
    raise RequestError(f"--metrics: unknown {unknown} (choose from {','.join(known)})"
                       if unknown else f"--metrics is empty (choose from {','.join(known)})")
  return metrics


@dataclasses.dataclass
class SamplingPlan:
  """What to sample, read from the flags and the run's config (no weights yet)."""
  num_steps: int
  sampler: str
  options: dict          # keyword options for sampling.generate (sampler only if changed)
  guidance: float
  warning: Optional[str]  # a caveat (guidance, step count) the script prints as a warning


def plan_sampling(config, method, *, steps: Optional[int], ts: Optional[Sequence[str]],
                  grid_points: Optional[int], sampler: Optional[str],
                  guidance: Optional[float]) -> SamplingPlan:
  """The step count, sampler and options the flags mean for this run, or a RequestError."""
  # pylint: disable-next=g-import-not-at-top
  from cm_jax import sampling
  options = {}
  chosen = sampler or config.sample.sampler
  if chosen != config.sample.sampler:
    options["sampler"] = chosen
  num_steps = steps or config.sample.num_steps
  if ts:
    options["ts"] = parse_ts(ts, config, grid_points)
    num_steps = steps or sampling.ts_num_steps(config, options["ts"], grid_points)
  if grid_points and "grid_points" in config.sample:
    options["grid_points"] = grid_points
  w = guidance if guidance is not None else config.sample.get("guidance", 0.0)
  if w is not None and float(w) < 0:  # (1 + w) x_c - w x_u with w < 0 pushes toward x_u
    raise RequestError(f"--guidance must be >= 0 (w = 0: no guidance; diffusers' "
                       f"guidance_scale = 1 + w), got {float(w):g}")
  try:
    guided, warning = sampling.guidance_options(method, w)
  except ValueError as e:
    raise RequestError(str(e)) from None
  options.update(guided)
  steps_warning = getattr(method, "steps_warning", None)  # e.g. a multistep model's S
  extra = steps_warning(int(num_steps)) if steps_warning is not None else None
  if extra:
    warning = f"{warning}; {extra}" if warning else extra
  return SamplingPlan(num_steps=int(num_steps), sampler=chosen, options=options,
                      guidance=float(w or 0.0), warning=warning)


def read_weights(config, workdir: str, which: Optional[str], num_steps: int,
                 step: Optional[int]):
  """The run's `which` weights for sampling `num_steps` (cm_jax.runs.Run), or RequestError
  for a missing / unreadable checkpoint or an unknown copy."""
  # pylint: disable-next=g-import-not-at-top
  from cm_jax import runs, sampling
  try:  # only the chosen copy of the weights is read (cm_jax.runs)
    # A progressive-distillation run keeps one student per step count: read that one.
    ckpt_step = sampling.checkpoint_step_for(config, num_steps, step)
    return runs.load_run(workdir, which or config.sample.params, ckpt_step)
  except (ValueError, FileNotFoundError) as e:
    raise RequestError(str(e)) from None


def prompt_options(method, prompt: Optional[str],
                   negative_prompt: Optional[str]) -> dict:
  """{'prompt_ids': (1, L), 'negative_prompt_ids': (1, L)} token ids for a text-to-image
  run (any method with a text encoder: latent diffusion, latent consistency models; a
  prompt longer than the tokenizer's 77 tokens is truncated with one warning line, as
  diffusers does), {} when neither flag is given; RequestError for a run without text."""
  if prompt is None and negative_prompt is None:
    return {}
  # The class attribute: reading `parts` on the instance would load the frozen networks.
  if getattr(type(method), "parts", None) is None:
    raise RequestError(f"--prompt / --negative_prompt apply to text-to-image runs (latent "
                       f"diffusion, latent consistency models); this run's method is "
                       f"{getattr(method, 'name', '?')!r}")
  if negative_prompt is not None and getattr(method, "guidance_kind", None) == "embedding":
    # Its guidance is learned against the empty prompt, and one evaluation has no other.
    raise RequestError("--negative_prompt: an LCM with a guidance embedding guides away from "
                       "the empty prompt it was distilled with and takes no negative prompt "
                       "(nor does diffusers' LatentConsistencyModelPipeline)")
  try:
    options = {}
    if prompt is not None:
      options["prompt_ids"] = method.parts.tokenize([prompt])
    if negative_prompt is not None:
      options["negative_prompt_ids"] = method.parts.tokenize([negative_prompt])
    return options
  except (ValueError, FileNotFoundError) as e:
    raise RequestError(str(e)) from None


def read_pretrained(folder: str, lora: Optional[str] = None):
  """The UNet weights of a diffusers folder as a cm_jax.runs.Run, with the LoRA file `lora`
  (PEFT / diffusers or kohya-ss format, e.g. an LCM-LoRA) merged into them when given:
  W + scale A B on every adapted layer (cm_jax.nets.lora). RequestError for an unreadable
  folder or file, or a LoRA made for another network."""
  # pylint: disable-next=g-import-not-at-top
  from cm_jax import runs
  from cm_jax.nets import sd_folder
  try:
    unet = sd_folder.load_sd_folder(folder, components=("unet",)).unet_params
  except (ValueError, FileNotFoundError) as e:
    raise RequestError(str(e)) from None
  which = "pretrained"
  if lora:
    # pylint: disable-next=g-import-not-at-top
    from cm_jax.nets import lora as lora_lib
    from cm_jax.nets import lora_files
    try:
      adapters, scale = lora_files.load_lora_file(lora, unet)
      unet = lora_lib.merge_lora(unet, adapters, scale)
    except (ValueError, FileNotFoundError) as e:
      raise RequestError(f"--lora: {e}") from None
    which = "pretrained + LoRA"
  return runs.Run(config=None, params=unet, step=0, which=which, kind="imported")
