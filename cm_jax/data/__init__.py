"""Input pipelines: digits (embedded), TFDS (array_record via Grain), npz and image folders.

    it = build_train_iterator(config.data, global_batch_size=128, seed=0,
                              process_index=jax.process_index(),
                              process_count=jax.process_count())
    batch = next(it)          # {'image': f32 (B_local, H, W, C) in [-1, 1], 'label': i32 (B_local,)}
    state = it.get_state()    # JSON-serialisable; it.set_state(state) resumes exactly
"""

from cm_jax.data.pipeline import TrainIterator, build_train_iterator, load_reference_images
from cm_jax.data.sources import NAMES, DatasetInfo, dataset_info

__all__ = [
    "NAMES",
    "DatasetInfo",
    "TrainIterator",
    "build_train_iterator",
    "dataset_info",
    "load_reference_images",
]
