"""The digits quality metric: its classifier, its cache, and that it ranks what it should."""
import numpy as np
import pytest

from cm_jax.eval import digits_classifier, digits_metric


@pytest.fixture(scope="module")
def split():
  return digits_classifier.digits_split()


@pytest.fixture(scope="module")
def metric(split):
  (train_x, _), _ = split
  # Reference = the classifier's training images; probes = the 360 it never saw.
  return digits_metric.DigitsMetric(reference=train_x)


def test_classifier_is_cached_under_its_recipe_hash(metric, monkeypatch):
  clf = metric.classifier
  assert digits_classifier.recipe_sha256()[:16] in clf.path
  assert clf.holdout_accuracy > 0.95
  monkeypatch.setattr(digits_classifier, "train", lambda *a, **k: pytest.fail("retrained"))
  again = digits_classifier.load_or_train()
  assert again.params_sha256 == clf.params_sha256 and again.path == clf.path
  fp = clf.fingerprint()
  assert fp["recipe_sha256"] == digits_classifier.recipe_sha256()
  assert len(fp["params_sha256"]) == 64


def test_recipe_hash_changes_with_the_recipe():
  changed = dict(digits_classifier.RECIPE, train=dict(digits_classifier.RECIPE["train"], steps=1))
  assert digits_classifier.recipe_sha256(changed) != digits_classifier.recipe_sha256()


def test_split_is_fixed_and_disjoint(split):
  (train_x, train_y), (hold_x, hold_y) = split
  assert len(train_x) == 1437 and len(hold_x) == 360
  assert train_x.dtype == np.uint8 and train_x.shape[1:] == (8, 8, 1)
  (train_x2, _), (hold_x2, _) = digits_classifier.digits_split()
  np.testing.assert_array_equal(hold_x, hold_x2)
  train_rows = {r.tobytes() for r in train_x}
  # sklearn's digits hold a few exact duplicates; nearly all held-out images are unseen.
  assert sum(r.tobytes() in train_rows for r in hold_x) < 10


def test_ranks_real_above_blurred_above_noise(metric, split):
  _, (hold_x, hold_y) = split
  noise = np.random.default_rng(0).integers(0, 256, hold_x.shape).astype(np.uint8)
  real = metric(hold_x, hold_y)
  blurred = metric(digits_metric.blur(hold_x, 1), hold_y)
  noisy = metric(noise, hold_y)
  print("\nFD-digits (360 held-out vs 1437 train): real {:.2f}, blurred {:.2f}, noise {:.2f}; "
        "coverage {:.2f} / {:.2f} / {:.2f}; accuracy {:.3f} / {:.3f} / {:.3f}".format(
            real["fd_digits"], blurred["fd_digits"], noisy["fd_digits"], real["coverage"],
            blurred["coverage"], noisy["coverage"], real["accuracy"], blurred["accuracy"],
            noisy["accuracy"]))
  assert real["fd_digits"] < blurred["fd_digits"] < noisy["fd_digits"]
  assert real["fd_digits"] < 0.2 * blurred["fd_digits"]
  assert real["coverage"] == 1.0 and real["class_entropy"] > 0.98
  assert real["accuracy"] > 0.95 > blurred["accuracy"] > noisy["accuracy"]
  assert real["confident"] > blurred["confident"] > noisy["confident"]


def test_class_metrics_on_known_predictions():
  k = 10
  logits = np.full((100, k), -20.0)
  logits[np.arange(100), np.arange(100) % k] = 20.0        # confident, all classes equally
  out = digits_metric.class_metrics(logits, labels=np.arange(100) % k)
  assert out["coverage"] == 1.0 and out["accuracy"] == 1.0 and out["confident"] == 1.0
  assert out["class_entropy"] == pytest.approx(1.0)
  collapsed = np.zeros((100, k))
  collapsed[:, 7] = 20.0                                   # mode collapse onto one class
  out = digits_metric.class_metrics(collapsed, labels=np.arange(100) % k)
  assert out["coverage"] == pytest.approx(0.1) and out["class_entropy"] == 0.0
  assert out["accuracy"] == pytest.approx(0.1)
  unsure = np.zeros((100, k))                              # uniform: nothing is confident
  assert digits_metric.class_metrics(unsure)["coverage"] == 0.0
