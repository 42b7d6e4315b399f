"""Command-line parsing whose mistakes end in one line, not a traceback.

absl parses flags (and ml_collections loads the --config file, its ':variant' and every
--config.* override) before main() runs, and reports a bad config file, variant or key
with a traceback of the config machinery. `parse_flags_or_exit` is an absl
`flags_parser` that turns any of those into one line naming what the user typed.
"""
from __future__ import annotations

import os
import sys

from absl import flags


def describe(error: Exception, argv) -> str:
  """One line for a flag-parsing failure; the offending --config.* override if it is one."""
  text = str(error).strip()
  if isinstance(error, (AttributeError, KeyError)):
    key = text.strip("\"'")
    typed = [a for a in argv if a.startswith("--config.") and key in a.split("=")[0]]
    where = typed[0].split("=")[0] if typed else key
    return (f"{where}: the config has no such field (overrides can only set keys that exist; "
            f"see configs/base.py and the config file)")
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  return lines[-1] if lines else type(error).__name__


def config_file(argv):
  """The file of --config=PATH[:variant] / --config PATH[:variant] in argv, or None."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1].split(":", 1)[0]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1].split(":", 1)[0]
  return None


def parse_flags_or_exit(argv):
  path = config_file(argv)
  # ml_collections defers a missing file's error to first use and logs a traceback now.
  if path is not None and not os.path.isfile(path):
    sys.exit(f"{os.path.basename(argv[0])}: --config {path!r}: no such file "
             f"(the configs are in configs/, e.g. configs/digits_edm.py)")
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    sys.exit(f"{os.path.basename(argv[0])}: {describe(e, argv)}")
