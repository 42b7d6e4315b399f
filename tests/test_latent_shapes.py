"""The network's input shape comes from the method (issue 9 item 7): a latent method's
network is built on its latent shape, and sampling decodes back to pixels."""
import jax
import jax.numpy as jnp
import numpy as np

from cm_jax import methods, sampling
from cm_jax.methods.edm import EDM
from cm_jax.train import builders
from configs import digits_edm


class LatentEDM(EDM):
  """EDM in a made-up 4x4x2 latent space whose decoder is nearest upsampling of channel 0."""
  name = "latent_edm_test"

  @classmethod
  def network_input_shape(cls, config):
    return (4, 4, 2)

  def decode(self, z):
    return jnp.repeat(jnp.repeat(z[..., :1], 2, axis=1), 2, axis=2)


def test_latent_method_shapes_network_and_decodes(monkeypatch):
  monkeypatch.setitem(methods.METHODS, LatentEDM.name, LatentEDM)
  config = digits_edm.get_config("tiny")
  config.method.name = LatentEDM.name
  config.model.update(channel_mult=(1,), attention_resolutions=())
  parts = builders.build_parts(config)
  assert parts.image_shape == (4, 4, 2)
  params = builders.init_params(parts, config, jax.random.key(0))
  assert params["input_blocks_0_0"]["kernel"].shape[2] == 2   # latent channels in
  images, _ = sampling.generate(parts.method, params, num=2, seed=0, batch_size=2,
                                num_steps=2, image_shape=parts.image_shape,
                                num_classes=config.data.num_classes)
  assert images.shape == (2, 8, 8, 1) and images.dtype == np.uint8
