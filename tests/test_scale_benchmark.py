"""benchmarks/throughput.py: config loading with overrides and the table (no compiling here;
the benchmark itself is run by hand, see its docstring)."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
  spec = importlib.util.spec_from_file_location(
      "throughput", os.path.join(ROOT, "benchmarks", "throughput.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_config_overrides_are_typed():
  bench = _bench()
  c = bench.load_config("configs/cifar10_edm.py:tiny",
                        ["--config.mesh.fsdp=2", "--config.model.remat=True",
                         "--config.model.dtype=bfloat16", "--config.optim.lr=5e-4"])
  assert c.mesh.fsdp == 2 and c.model.remat is True
  assert c.model.dtype == "bfloat16" and c.optim.lr == 5e-4
  assert c.data.image_size == 8  # the :tiny variant


def test_table_lists_every_config():
  bench = _bench()
  row = dict(config="configs/digits_edm.py:tiny", params=210_000, batch=16, train_img_s=650.0,
             train_step_s=0.024, train_compile_s=30.0, train_tflop_s=0.016, sample_img_s=300.0,
             sample_nfe=7, sample_compile_s=6.0, peak_memory_bytes=2**30,
             peak_memory_source="rss")
  table = bench.format_table([row, dict(config="configs/imagenet64_edm.py", batch=2,
                                        error="timeout after 1800 s")])
  lines = table.splitlines()
  assert len(lines) == 4 and "train img/s" in lines[0]
  assert "digits_edm.py:tiny" in lines[2] and "650.0" in lines[2] and "1.00 GiB (rss)" in lines[2]
  assert "error: timeout" in lines[3]


def test_compare_table_and_helpers():
  bench = _bench()
  assert bench.split_spec("configs/digits_edm.py:tiny@20", 5) == ("configs/digits_edm.py:tiny", 20)
  assert bench.split_spec("configs/digits_edm.py", 5) == ("configs/digits_edm.py", 5)
  assert bench.error_line("Traceback\nKeyError: 'teacher'\n----\nFor simplicity, JAX ...", 1) \
      == "KeyError: 'teacher'"
  run = lambda ms, img: dict(train_step_s=ms / 1e3, sample_img_s=img, train_compile_s=30.0,
                             sample_compile_s=5.0)
  s = bench.compare_summary("configs/digits_edm.py:tiny", [run(50, 100), run(55, 90)],
                            [run(52, 95), run(60, 99)], "")
  assert s["step_ms"]["ref"] == 50 and s["step_ms"]["new"] == 52
  assert abs(s["step_ms"]["ratio"] - 1.04) < 1e-9 and s["sample_img_s"]["ratio"] == 0.99
  assert abs(s["noise"] - 60 / 52 + 1) < 1e-9 and not s["errors"]
  lines = bench.format_compare([s]).splitlines()
  assert len(lines) == 3 and "new/ref" in lines[0] and "1.040" in lines[2] and "15%" in lines[2]
